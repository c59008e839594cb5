"""RequestError: every refusal of a request, carrying its HTTP status and OpenAI error fields
(gRPC maps the status to a code)."""

from __future__ import annotations


class RequestError(Exception):
    """A request refused before it ran, with the HTTP status and OpenAI error fields that describe it."""

    def __init__(self, status: int, message: str, *, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def __reduce__(self):  # picklable, so it can cross to Serve's gRPC proxy
        return _request_error, (self.status, self.message, self.type, self.param, self.code)

    @classmethod
    def invalid(cls, message: str, param: str | None = None, code: str | None = None) -> "RequestError":
        return cls(400, message, type_="invalid_request_error", param=param, code=code)

    @classmethod
    def unavailable(cls, message: str) -> "RequestError":
        return cls(503, message, type_="service_unavailable")


def _request_error(status, message, type_, param, code) -> RequestError:
    return RequestError(status, message, type_=type_, param=param, code=code)
