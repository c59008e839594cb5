"""The served API's /openapi.json: the request bodies (the pydantic models the routes validate
with) and the response bodies, which the routes build as plain dicts (openai_protocol.py), so
they are declared here as models and tested against real answers (tests/deployments/test_serving.py).
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

from deployments.openai_protocol import ChatCompletionRequest, CompletionRequest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the documented shape is the whole shape


class PromptTokensDetails(_Strict):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Usage(_Strict):
    """Each prompt counts once (n choices share it); completion tokens of every choice."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ErrorDetail(_Strict):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Strict):
    error: ErrorDetail


class FunctionCallOut(_Strict):
    name: str
    arguments: str  # JSON text of the arguments object


class ToolCallOut(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class FunctionCallDelta(_Strict):
    name: str | None = None  # in the call's first fragment
    arguments: str | None = None  # the next piece of the arguments' JSON text


class ToolCallDelta(_Strict):
    """A streamed fragment of a call: the first has its id, type and name; the next ones pieces of
    its arguments, to be joined."""

    index: int  # which call of the answer
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | None  # None when the answer is only tool calls
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Strict):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: dict | None


class ChatCompletion(_Strict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Strict):
    role: Literal["assistant"] | None = None  # in the first chunk only
    content: str
    tool_calls: list[ToolCallDelta] | None = None  # fragments of the answer's tool calls, as they come


class ChatChunkChoice(_Strict):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: dict | None


class ChatCompletionChunk(_Strict):
    """One `data:` line of a streamed chat answer; the last chunk carries `usage` (and no choices)
    when `stream_options.include_usage`; `data: [DONE]` ends the stream. A stream that fails ends
    with `data: {"error": {...}}` (ErrorResponse), then `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Strict):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: dict | None


class Completion(_Strict):
    """The whole answer; streamed, each `data:` line is one of these without `usage` (but for the
    last when `stream_options.include_usage`), then `data: [DONE]`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Strict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Strict):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Strict):
    status: Literal["serving"]


ERRORS = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or path",
          413: "body too large", 429: "queue full (Retry-After)", 503: "draining or unavailable (Retry-After)"}  # fmt: skip

GENERATE_ERRORS = (400, 401, 404, 413, 429, 503)
# (path, method): request body model or None, response model, stream chunk model or None, error statuses
OPERATIONS = {
    ("/v1/chat/completions", "post"): (ChatCompletionRequest, ChatCompletion, ChatCompletionChunk, GENERATE_ERRORS),
    ("/v1/completions", "post"): (CompletionRequest, Completion, Completion, GENERATE_ERRORS),
    ("/v1/models", "get"): (None, ModelList, None, (401,)),
    ("/v1/models/{model_id}", "get"): (None, ModelCard, None, (401, 404)),
    ("/health", "get"): (None, Health, None, (503,)),
}


def openapi(app: FastAPI) -> dict:
    """The generated schema with every body filled in; cached on the app."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})

    def ref(model: type[BaseModel]) -> dict:
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"application/json": {"schema": ref(ErrorResponse)}}
    for (path, method), (request, response, chunk, errors) in OPERATIONS.items():
        operation = schema["paths"][path][method]
        if request is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(request)}}}
        ok = {"application/json": {"schema": ref(response)}}
        if chunk is not None:
            ok["text/event-stream"] = {"schema": ref(chunk)}
        operation["responses"] = {"200": {"description": "OK", "content": ok}}
        for status in errors:
            operation["responses"][str(status)] = {"description": ERRORS[status], "content": error}
    app.openapi_schema = schema
    return schema
