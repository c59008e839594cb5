"""The OpenAI API's shapes: the request bodies we accept and the GenerateRequest each becomes, the
response bodies and stream chunks a run of RequestOutput deltas becomes, and the error body."""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.protocol import GenerateRequest, RequestOutput, TokenLogprob
from deployments.protocol import RequestError
from deployments.tools import ToolCallStream, ToolFormat, ToolSetup
from model.sampling_params import SamplingParams

log = logging.getLogger("shardserve")


MAX_CHOICES = 64  # n, and n times the prompts of one /v1/completions request


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaSpec(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema", description="a JSON Schema; absent: any JSON value")
    strict: bool | None = None  # the grammar always enforces the schema


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only with it")
        return self

    def schema_text(self) -> str | None:
        """The JSON Schema the output must match, as SamplingParams.json_schema takes it."""
        if self.type == "json_object":
            return '{"type": "object"}'
        if self.type == "json_schema":
            return json.dumps(self.json_schema.schema_ if self.json_schema.schema_ is not None else {})
        return None


class _Common(BaseModel):
    # A field this server does not know is refused (400 naming it), never silently ignored; OpenAI's
    # fields that change nothing here (metadata, store, service_tier) are accepted as such.
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="shardserve extra: keep only the k most likely tokens; 0 = off")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    # OpenAI's penalties and bias (null = default), applied as vLLM does (model/sampling.py).
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description="token id (a string) -> bias in [-100, 100]")
    repetition_penalty: float | None = Field(None, gt=0, description="shardserve extra: > 1 discourages tokens "
                                             "of the prompt and output, transformers-style; 1 = off")  # fmt: skip
    min_tokens: int = Field(0, ge=0, description="shardserve extra: no EOS, stop token or stop string before this many")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices per prompt; with a seed, choice j samples with seed + j")
    metadata: dict[str, str] | None = None  # accepted, not kept
    store: bool | None = None  # nothing is stored
    service_tier: str | None = None  # one tier here


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None  # text, or an array of text parts
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _content(self):
        if isinstance(self.content, list):  # text parts, joined as one text
            texts = []
            for j, part in enumerate(self.content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"content[{j}]: part type {kind!r} is not supported; only 'text' parts with a 'text' string")
                texts.append(part["text"])
            self.content = "\n".join(texts)
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        return self

    def for_template(self) -> dict:
        out = {"role": self.role, "content": self.content or ""}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # a JSON Schema of the arguments object
    strict: bool | None = None  # forced calls always follow the schema


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _tool_choice(self):
        names = [t.function.name for t in self.tools or []]
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among tools {names}")
        if self.tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        if self.forced_tools() and self.response_format and self.response_format.type != "text":
            raise ValueError("a forced tool call (tool_choice) and response_format cannot both shape the answer")
        return self

    def active_tools(self) -> list[dict] | None:
        """The tools offered to the model (none when tool_choice is 'none')."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def forced_tools(self) -> list[dict] | None:
        """The tools one of which must be called: all ('required') or the named one; None: the model decides."""
        if self.tool_choice == "required":
            return self.active_tools()
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.active_tools() if t["function"]["name"] == self.tool_choice.function.name]
        return None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]  # text or token ids; a list of either: one choice each
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @model_validator(mode="after")
    def _prompts(self):
        prompts = self.prompts()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompt must not be empty, nor hold an empty prompt")
        if len(prompts) * self.n > MAX_CHOICES:
            raise ValueError(f"{len(prompts)} prompts x n={self.n} is over {MAX_CHOICES} choices in one request")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported (it would need the prompt's logprobs)")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse_error(e: RequestError) -> str:
    """How a stream that fails ends: the OpenAI error event, then [DONE]; never a silently cut stream."""
    return f"data: {json.dumps(e.body())}\n\ndata: [DONE]\n\n"


def error_response(e: RequestError, headers: dict | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if e.retry_after is not None:
        headers["Retry-After"] = str(e.retry_after)
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error the app answers gets the OpenAI body, the framework's own included: an unknown
    path (404), a wrong method (405), an undecodable body, an exception nothing caught."""

    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /v1/models, /v1/completions, /v1/chat/completions"
        elif e.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(e.detail)
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(message, kind), status_code=e.status_code, headers=getattr(e, "headers", None))

    async def validation_error(request: Request, e: RequestValidationError):
        return error_response(RequestError.invalid(f"invalid request: {e.errors()[0].get('msg', 'bad value')}"))

    async def internal_error(request: Request, e: Exception):
        # The detail (a traceback, actor ids, addresses) goes to the log; the client gets the id to quote.
        rid = uuid.uuid4().hex
        log.error("request %s (%s %s) failed", rid, request.method, request.url.path, exc_info=e)
        return error_response(RequestError(500, f"internal error (request id {rid})", type_="internal_error"))

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


# -- requests ---------------------------------------------------------------------------------------
async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, read no further than `max_bytes`: 413 past it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object (parse_json), read no further than `max_bytes`: 413 past it."""
    return parse_json(await read_body(request, max_bytes))


def parse_json(raw: bytes) -> dict:
    """A body as a JSON object; 400 for one that is not UTF-8, not JSON, nested deeper than the
    parser goes, or not an object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError.invalid(f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError.invalid(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError.invalid("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError.invalid("request body must be a JSON object")
    return body


def _too_large(max_bytes: int) -> RequestError:
    return RequestError(413, f"request body is larger than the limit of {max_bytes} bytes (max_request_body_bytes)",
                        type_="invalid_request_error", code="request_too_large")  # fmt: skip


def validate(body: dict, model_cls):
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        message = "this server does not support the field" if err["type"] == "extra_forbidden" else err["msg"]
        raise RequestError.invalid(f"{param}: {message}", param=param) from None


def _sampling(req, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens,  # None: the rest of the context
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop=req.stop or (),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            json_schema=req.response_format.schema_text() if req.response_format else None,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else 1.0,
            logit_bias=req.logit_bias or (),  # ids are checked against the vocabulary by the engine
            min_tokens=req.min_tokens,
        )
    except ValueError as e:
        raise RequestError.invalid(str(e), code="invalid_request") from None


@dataclass(frozen=True)
class Plan:
    """What one API request becomes: an engine request per choice (choice i of prompt p is index
    p * n + i), how to read tool calls (None: no tools) and, for echo, each choice's prompt text."""

    requests: list[GenerateRequest]
    n: int  # choices per prompt
    tool_format: ToolFormat | None = None
    echo: list[str] | None = None


def _choices(request: GenerateRequest, n: int) -> list[GenerateRequest]:
    """n requests for one prompt; seeded ones draw with seed, seed + 1, ... so the choices differ."""
    seed = request.params.seed
    return [request if seed is None or j == 0 else dataclasses.replace(request, params=dataclasses.replace(
        request.params, seed=seed + j)) for j in range(n)]  # fmt: skip


def chat_request(req: ChatCompletionRequest, tooling: ToolSetup) -> Plan:
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    tools = req.active_tools()
    messages, template_tools = tooling.messages([m.for_template() for m in req.messages], tools)
    params = _sampling(req, req.max_completion_tokens or req.max_tokens, logprobs)
    forced = req.forced_tools()
    if forced:  # the answer must be calls of these tools, with arguments valid against their schemas
        params = dataclasses.replace(params, lark_grammar=tooling.format.grammar(forced, req.parallel_tool_calls))
    request = GenerateRequest(messages, params, tools=template_tools)
    return Plan(_choices(request, req.n), req.n, tooling.format if tools else None)


def completion_request(req: CompletionRequest, decode=None) -> Plan:
    """decode(token ids) -> text, for echoing prompts given as token ids."""
    params = _sampling(req, req.max_tokens, req.logprobs)
    prompts = req.prompts()
    requests = [r for p in prompts for r in _choices(GenerateRequest(p, params, raw=True), req.n)]
    echo = None
    if req.echo:
        echo = [p if isinstance(p, str) else decode(p) for p in prompts for _ in range(req.n)]
    return Plan(requests, req.n, echo=echo)


# -- responses --------------------------------------------------------------------------------------
def usage(item: RequestOutput) -> dict:
    return usage_of([item], 1)


def usage_of(last: list[RequestOutput], n: int) -> dict:
    """Usage of a request's choices (their last deltas): each prompt counts once, every choice's tokens."""
    prompts = last[::n]
    p, c = sum(i.prompt_tokens for i in prompts), sum(i.completion_tokens for i in last)
    cached = sum(i.cached_tokens for i in prompts)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


def logprobs_of(items: list[RequestOutput]) -> list[TokenLogprob]:
    return [lp for item in items for lp in item.logprobs or []]


class _Shape:
    """OpenAI response envelopes; subclasses say how one choice and its logprobs look."""

    id_prefix: str
    object_full: str
    object_chunk: str

    @classmethod
    def _envelope(cls, obj: str, rid: str, model: str, created: int, choices: list, usage: dict | None = None) -> dict:
        body = {"id": f"{cls.id_prefix}-{rid}", "object": obj, "created": created, "model": model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    @classmethod
    def _logprobs(cls, items: list[RequestOutput]) -> dict | None:
        entries = logprobs_of(items)
        return cls._format_logprobs(entries) if entries else None

    @classmethod
    def full(cls, choices: list[list[RequestOutput]], rid: str, model: str, created: int, plan) -> dict:
        out = []
        for index, items in enumerate(choices):
            choice = cls._full_choice((plan.echo[index] if plan.echo else "") + "".join(i.text for i in items), index)
            choice.update(finish_reason=items[-1].finish_reason, logprobs=cls._logprobs(items))
            out.append(choice)
        return cls._envelope(cls.object_full, rid, model, created, out, usage_of([c[-1] for c in choices], plan.n))

    @classmethod
    def chunk(cls, item: RequestOutput, index: int, rid: str, model: str, created: int, first: bool = False,
              prefix: str = "") -> dict:  # fmt: skip
        choice = cls._chunk_choice(prefix + item.text, first, index)
        choice.update(finish_reason=item.finish_reason, logprobs=cls._logprobs([item]))
        return cls._envelope(cls.object_chunk, rid, model, created, [choice])

    @classmethod
    def usage_chunk(cls, usage: dict, rid: str, model: str, created: int) -> dict:
        return cls._envelope(cls.object_chunk, rid, model, created, [], usage)


class ChatShape(_Shape):
    id_prefix, object_full, object_chunk = "chatcmpl", "chat.completion", "chat.completion.chunk"

    @staticmethod
    def _full_choice(text: str, index: int) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text}}

    @staticmethod
    def _chunk_choice(text: str, first: bool, index: int) -> dict:
        delta = {"content": text}
        if first:
            delta["role"] = "assistant"
        return {"index": index, "delta": delta}

    @staticmethod
    def _format_logprobs(entries: list[TokenLogprob]) -> dict:
        return {
            "content": [
                {
                    "token": lp.token,
                    "logprob": lp.logprob,
                    "bytes": list(lp.token.encode()),
                    "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top],
                }
                for lp in entries
            ]
        }


def with_tool_calls(body: dict, fmt: ToolFormat) -> dict:
    """A whole chat completion with the calls in each choice's text moved into message.tool_calls."""
    for choice in body["choices"]:
        content, calls = fmt.parse(choice["message"]["content"])
        if calls:
            choice["message"].update(content=content, tool_calls=[c.openai() for c in calls])
            if choice["finish_reason"] == "stop":
                choice["finish_reason"] = "tool_calls"
    return body


def tool_call_chunk(chunk: dict, stream: ToolCallStream, item: RequestOutput) -> dict:
    """A chat chunk whose text went through the stream's tool-call reader: the content it lets out,
    and the calls' fragments as delta.tool_calls (a call's id and name, then its arguments' text)."""
    choice = chunk["choices"][0]
    content, fragments = stream.feed(item.text)
    if item.finished:
        rest, last = stream.finish()
        content, fragments = content + rest, fragments + last
    choice["delta"]["content"] = content
    if fragments:
        choice["delta"]["tool_calls"] = fragments
    if item.finished and stream.calls and choice["finish_reason"] == "stop":
        choice["finish_reason"] = "tool_calls"
    return chunk


class CompletionShape(_Shape):
    id_prefix, object_full, object_chunk = "cmpl", "text_completion", "text_completion"

    @staticmethod
    def _full_choice(text: str, index: int) -> dict:
        return {"index": index, "text": text}

    @staticmethod
    def _chunk_choice(text: str, first: bool, index: int) -> dict:
        return {"index": index, "text": text}

    @staticmethod
    def _format_logprobs(entries: list[TokenLogprob]) -> dict:
        return {
            "tokens": [lp.token for lp in entries],
            "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [dict(lp.top) for lp in entries],
        }

