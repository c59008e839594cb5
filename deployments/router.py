"""Router: the ingress in front of the LLMServer replicas, for HTTP (OpenAI-compatible) and gRPC.

Both transports share one path: authenticate, check the model name, validate
the body with the same pydantic models, start the request on a replica and
wait for its first item, so that any refusal is known before a byte is sent.
A refusal is a ``RequestError`` carrying an HTTP status; gRPC maps it to a
status code. Serve's handle picks the replica (deployments/request_router.py)
and streams the deltas back, which become SSE chunks or gRPC messages here.
"""


import json
import time
import uuid
from typing import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from cluster.protocol import GenerateRequest, RequestOutput, TokenLogprob
from deployments.metrics import RouterMetrics
from deployments.openai_protocol import ChatCompletionRequest, CompletionRequest, error_response
from deployments.placement import ROUTER_CPUS
from deployments.proto import shardserve_pb2 as pb
from deployments.protocol import RequestError, ServedOutput
from model.sampling_params import SamplingParams

api = FastAPI(title="shardserve", description="OpenAI-compatible API of a sharded LLM on Ray")


def _error_response(e: RequestError) -> JSONResponse:
    return error_response(e.status, e.message, type_=e.type, param=e.param, code=e.code)


GRPC_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def _validate(body: dict, model_cls):
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise RequestError.invalid(f"{param}: {err['msg']}", param=param) from None


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
        )
    except ValueError as e:
        raise RequestError.invalid(str(e), code="invalid_request") from None


def chat_request(req: ChatCompletionRequest) -> GenerateRequest:
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    messages = [m.model_dump() for m in req.messages]
    return GenerateRequest(messages, _sampling(req, req.max_completion_tokens or req.max_tokens, logprobs))


def completion_request(req: CompletionRequest) -> GenerateRequest:
    return GenerateRequest(req.prompt, _sampling(req, req.max_tokens, req.logprobs), raw=True)


def grpc_request_body(request: pb.GenerateRequest, model_name: str) -> tuple[dict, type]:
    """The gRPC request as the JSON body of the matching HTTP route, so both are validated alike."""
    if bool(request.prompt) == bool(request.messages):
        raise RequestError.invalid("set exactly one of prompt and messages")
    body: dict = {"model": request.model or model_name, "top_k": request.top_k, "ignore_eos": request.ignore_eos}
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        if request.HasField(name):
            body[name] = getattr(request, name)
    if request.stop:
        body["stop"] = list(request.stop)
    if request.messages:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        if request.HasField("logprobs"):
            body.update(logprobs=True, top_logprobs=request.logprobs)
        return body, ChatCompletionRequest
    body["prompt"] = request.prompt
    if request.HasField("logprobs"):
        body["logprobs"] = request.logprobs
    return body, CompletionRequest


def grpc_response(items: list[RequestOutput], rid: str, model: str) -> pb.GenerateResponse:
    """One message for a run of deltas: the whole completion (unary) or one delta (streaming)."""
    last = items[-1]
    out = pb.GenerateResponse(
        id=rid,
        model=model,
        text="".join(i.text for i in items),
        token_ids=[t for i in items for t in i.token_ids],
        finish_reason=last.finish_reason or "",
    )
    if last.finish_reason:
        out.usage.CopyFrom(pb.Usage(**_usage(last)))
    for lp in _logprobs(items):
        top = [pb.TopLogprob(token=t, logprob=v) for t, v in lp.top]
        out.logprobs.append(pb.TokenLogprob(token=lp.token, token_id=lp.token_id, logprob=lp.logprob, top_logprobs=top))
    return out


def _usage(item: RequestOutput) -> dict:
    p, c = item.prompt_tokens, item.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _logprobs(items: list[RequestOutput]) -> list[TokenLogprob]:
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
        entries = _logprobs(items)
        return cls._format_logprobs(entries) if entries else None

    @classmethod
    def full(cls, items: list[RequestOutput], rid: str, model: str, created: int) -> dict:
        choice = cls._full_choice("".join(i.text for i in items))
        choice.update(finish_reason=items[-1].finish_reason, logprobs=cls._logprobs(items))
        return cls._envelope(cls.object_full, rid, model, created, [choice], _usage(items[-1]))

    @classmethod
    def chunk(cls, item: RequestOutput, rid: str, model: str, created: int, first: bool = False) -> dict:
        choice = cls._chunk_choice(item.text, first)
        choice.update(finish_reason=item.finish_reason, logprobs=cls._logprobs([item]))
        return cls._envelope(cls.object_chunk, rid, model, created, [choice])

    @classmethod
    def usage_chunk(cls, item: RequestOutput, rid: str, model: str, created: int) -> dict:
        return cls._envelope(cls.object_chunk, rid, model, created, [], _usage(item))


class ChatShape(_Shape):
    id_prefix, object_full, object_chunk = "chatcmpl", "chat.completion", "chat.completion.chunk"

    @staticmethod
    def _full_choice(text: str) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}}

    @staticmethod
    def _chunk_choice(text: str, first: bool) -> dict:
        delta = {"content": text}
        if first:
            delta["role"] = "assistant"
        return {"index": 0, "delta": delta}

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


class CompletionShape(_Shape):
    id_prefix, object_full, object_chunk = "cmpl", "text_completion", "text_completion"

    @staticmethod
    def _full_choice(text: str) -> dict:
        return {"index": 0, "text": text}

    @staticmethod
    def _chunk_choice(text: str, first: bool) -> dict:
        return {"index": 0, "text": text}

    @staticmethod
    def _format_logprobs(entries: list[TokenLogprob]) -> dict:
        return {
            "tokens": [lp.token for lp in entries],
            "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [dict(lp.top) for lp in entries],
        }


@serve.deployment(name="Router", ray_actor_options={"num_cpus": ROUTER_CPUS}, max_ongoing_requests=1000)
@serve.ingress(api)
class Router:
    def __init__(self, server: DeploymentHandle, api_key: str | None, model_name: str):
        self.server = server
        self.api_key = api_key
        self.model_name = model_name
        self.created = int(time.time())
        self.metrics = RouterMetrics(model_name)

    # -- checks and dispatch, shared by HTTP and gRPC ------------------------------
    def _authorize(self, authorization: str | None) -> None:
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            raise RequestError(401, "missing or wrong API key", type_="authentication_error", code="invalid_api_key")

    def _check_model(self, model) -> None:
        if model not in (None, self.model_name):
            raise RequestError(
                404,
                f"model {model!r} does not exist; this server serves {self.model_name!r}",
                type_="invalid_request_error",
                param="model",
                code="model_not_found",
            )

    async def _start(self, request: GenerateRequest) -> tuple[ServedOutput, AsyncIterator[RequestOutput]]:
        """Start the request on a replica; its first item, and the rest of its outputs."""
        gen = self.server.options(stream=True).generate.remote(request)
        try:
            first = await gen.__anext__()
        except RequestError:  # the replica refused it
            raise
        except BackPressureError as e:
            raise RequestError(429, f"server is busy, retry later: {e}", type_="rate_limit_error", code="queue_full")
        except Exception as e:  # no replica could take it, or its engine failed
            raise RequestError.unavailable(f"model is unavailable: {e}") from None

        async def outputs() -> AsyncIterator[RequestOutput]:
            yield first.output
            async for item in gen:
                yield item.output

        return first, outputs()

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "shardserve"}

    # -- HTTP ---------------------------------------------------------------------
    async def _http_request(self, request: Request, model_cls):
        """The validated request body; raises RequestError to refuse it."""
        self._authorize(request.headers.get("authorization"))
        try:
            body = await request.json()
        except json.JSONDecodeError as e:
            raise RequestError.invalid(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError.invalid("request body must be a JSON object")
        self._check_model(body.get("model"))
        return _validate(body, model_cls)

    async def _respond(self, request: Request, model_cls, to_request, shape):
        route = request.url.path
        try:
            req = await self._http_request(request, model_cls)
            first, outputs = await self._start(to_request(req))
        except RequestError as e:
            self.metrics.request(route, e.status)
            return _error_response(e)
        self.metrics.request(route, 200)
        rid = uuid.uuid4().hex
        headers = {"x-shardserve-replica": first.replica}  # which replica served it, for debugging
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                self._sse(outputs, shape, rid, include_usage), media_type="text/event-stream", headers=headers
            )
        items = [item async for item in outputs]
        return JSONResponse(shape.full(items, rid, self.model_name, self.created), headers=headers)

    async def _sse(self, outputs: AsyncIterator[RequestOutput], shape, rid: str, include_usage: bool) -> AsyncIterator[str]:
        last = None
        async for item in outputs:
            yield f"data: {json.dumps(shape.chunk(item, rid, self.model_name, self.created, first=last is None))}\n\n"
            last = item
        if include_usage:
            yield f"data: {json.dumps(shape.usage_chunk(last, rid, self.model_name, self.created))}\n\n"
        yield "data: [DONE]\n\n"

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request.headers.get("authorization"))
        except RequestError as e:
            self.metrics.request("/v1/models", e.status)
            return _error_response(e)
        self.metrics.request("/v1/models", 200)
        return {"object": "list", "data": [self._model_card()]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._respond(request, ChatCompletionRequest, chat_request, ChatShape)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._respond(request, CompletionRequest, completion_request, CompletionShape)

    # -- gRPC (method names are the RPC names in deployments/proto/shardserve.proto) --
    async def _grpc_start(self, request: pb.GenerateRequest, grpc_context, route: str):
        try:
            metadata = dict(grpc_context.invocation_metadata())
            self._authorize(metadata.get("authorization"))
            body, model_cls = grpc_request_body(request, self.model_name)
            self._check_model(body["model"])
            req = _validate(body, model_cls)
            started = await self._start(chat_request(req) if model_cls is ChatCompletionRequest else completion_request(req))
        except RequestError as e:
            self._grpc_refuse(grpc_context, e, route)
            raise
        self.metrics.request(route, grpc.StatusCode.OK.name)
        return started

    def _grpc_refuse(self, grpc_context, e: RequestError, route: str) -> None:
        grpc_context.set_code(GRPC_STATUS[e.status])
        grpc_context.set_details(e.message)
        self.metrics.request(route, GRPC_STATUS[e.status].name)

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        try:
            _, outputs = await self._grpc_start(request, grpc_context, "Generate")
        except RequestError:
            return pb.GenerateResponse()
        items = [item async for item in outputs]
        return grpc_response(items, uuid.uuid4().hex, self.model_name)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        # With no message sent, Serve's proxy only reports a code that comes with an exception,
        # so a refusal propagates from here.
        _, outputs = await self._grpc_start(request, grpc_context, "GenerateStream")
        rid = uuid.uuid4().hex
        async for item in outputs:
            yield grpc_response([item], rid, self.model_name)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context) -> pb.ListModelsResponse:
        try:
            self._authorize(dict(grpc_context.invocation_metadata()).get("authorization"))
        except RequestError as e:
            self._grpc_refuse(grpc_context, e, "ListModels")
            return pb.ListModelsResponse()
        self.metrics.request("ListModels", grpc.StatusCode.OK.name)
        card = self._model_card()
        return pb.ListModelsResponse(models=[pb.ModelCard(id=card["id"], created=card["created"], owned_by=card["owned_by"])])

    async def Health(self, request: pb.HealthRequest, grpc_context) -> pb.HealthResponse:
        return pb.HealthResponse(status="ok")
