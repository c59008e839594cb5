"""RequestError: every refusal of a request, carrying its HTTP status and OpenAI error fields
(gRPC maps the status to a code); RelayCall and RelayHead: what the Router and a replica pass
when the Relay holds the streams (``replica_failover``)."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.protocol import Resume


class RequestError(Exception):
    """A request refused, with the HTTP status and OpenAI error fields that describe it, and for
    429 and 503 the seconds after which a retry is likely to be served (``Retry-After``)."""

    def __init__(self, status: int, message: str, *, type_: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        """The OpenAI error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):  # picklable, so it can cross to Serve's gRPC proxy
        return _request_error, (self.status, self.message, self.type, self.param, self.code, self.retry_after)

    @classmethod
    def invalid(cls, message: str, param: str | None = None, code: str | None = None) -> "RequestError":
        return cls(400, message, type_="invalid_request_error", param=param, code=code)

    @classmethod
    def unavailable(cls, message: str, retry_after: int | None = None, code: str | None = None) -> "RequestError":
        return cls(503, message, type_="service_unavailable", code=code, retry_after=retry_after)


def _request_error(status, message, type_, param, code, retry_after=None) -> RequestError:
    return RequestError(status, message, type_=type_, param=param, code=code, retry_after=retry_after)


@dataclass(frozen=True)
class RelayCall:
    """An HTTP request as the Relay passes it to a replica (``replica_failover``): the body as the
    client sent it (the replica parses and checks it), and what the Router fixes for the whole
    answer, whichever replicas write it: its id, its creation time and, after a replica failed,
    what each choice already delivered."""

    route: str  # "/v1/chat/completions" | "/v1/completions"
    authorization: str | None
    body: bytes
    rid: str
    created: int
    resume: dict[int, Resume] | None = None  # choice index -> what the client already has of it


@dataclass(frozen=True)
class RelayHead:
    """The first item of a relayed answer the replica takes: its headers, and its JSON body unless it streams."""

    headers: dict[str, str]
    body: dict | None
