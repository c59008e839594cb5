"""Router: the OpenAI-compatible HTTP ingress in front of the LLMServer replicas.

It validates, authenticates and shapes requests; Serve's handle picks the
replica (power of two choices over replicas' outstanding requests, healthy
replicas only) and streams the deltas back, which become SSE chunks here.
"""


import json
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config import AppConfig
from deployments.openai_protocol import ChatCompletionRequest, CompletionRequest, error_response

api = FastAPI(title="shardserve", description="OpenAI-compatible API of a sharded LLM on Ray")


def _invalid(e: ValidationError) -> JSONResponse:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    return error_response(400, f"{param}: {err['msg']}", type_="invalid_request_error", param=param)


def _sampling(req, max_tokens: int | None, logprobs: int | None) -> dict:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return {
        "max_tokens": max_tokens,  # None: the rest of the context, filled in by the replica
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "seed": req.seed,
        "stop": stop,
        "ignore_eos": req.ignore_eos,
        "logprobs": logprobs,
    }


def _usage(item: dict) -> dict:
    p, c = item["prompt_tokens"], item["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


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
    def _logprobs(cls, items: list[dict]) -> dict | None:
        entries = [lp for item in items for lp in item["logprobs"]]
        return cls._format_logprobs(entries) if entries else None

    @classmethod
    def full(cls, items: list[dict], rid: str, model: str, created: int) -> dict:
        choice = cls._full_choice("".join(i["text"] for i in items))
        choice.update(finish_reason=items[-1]["finish_reason"], logprobs=cls._logprobs(items))
        return cls._envelope(cls.object_full, rid, model, created, [choice], _usage(items[-1]))

    @classmethod
    def chunk(cls, item: dict, rid: str, model: str, created: int, first: bool = False) -> dict:
        choice = cls._chunk_choice(item["text"], first)
        choice.update(finish_reason=item["finish_reason"], logprobs=cls._logprobs([item]))
        return cls._envelope(cls.object_chunk, rid, model, created, [choice])

    @classmethod
    def usage_chunk(cls, item: dict, rid: str, model: str, created: int) -> dict:
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
    def _format_logprobs(entries: list[dict]) -> dict:
        return {
            "content": [
                {
                    "token": lp["token"],
                    "logprob": lp["logprob"],
                    "bytes": list(lp["token"].encode()),
                    "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp["top"]],
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
    def _format_logprobs(entries: list[dict]) -> dict:
        return {
            "tokens": [lp["token"] for lp in entries],
            "token_logprobs": [lp["logprob"] for lp in entries],
            "top_logprobs": [dict(lp["top"]) for lp in entries],
        }


@serve.deployment(name="Router", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1000)
@serve.ingress(api)
class Router:
    def __init__(self, server: DeploymentHandle, config: AppConfig, model_name: str):
        self.server = server
        self.api_key = config.api_key
        self.model_name = model_name
        self.created = int(time.time())

    # -- plumbing -----------------------------------------------------------------
    def _refuse(self, request: Request, body: dict | None) -> JSONResponse | None:
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return error_response(401, "missing or wrong API key", type_="authentication_error", code="invalid_api_key")
        if body is not None and body.get("model") not in (None, self.model_name):
            return error_response(
                404,
                f"model {body.get('model')!r} does not exist; this server serves {self.model_name!r}",
                type_="invalid_request_error",
                param="model",
                code="model_not_found",
            )
        return None

    async def _parse(self, request: Request, model_cls):
        """The validated request body, or the error response that refuses it."""
        try:
            body = await request.json()
        except json.JSONDecodeError as e:
            return error_response(400, f"request body is not valid JSON: {e}", type_="invalid_request_error")
        if not isinstance(body, dict):
            return error_response(400, "request body must be a JSON object", type_="invalid_request_error")
        if (refusal := self._refuse(request, body)) is not None:
            return refusal
        try:
            return model_cls.model_validate(body)
        except ValidationError as e:
            return _invalid(e)

    async def _run(self, payload: dict, shape, req):
        """Start the request on a replica; a refusal comes back as the first item, before any byte is sent."""
        stream = req.stream
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        gen = self.server.options(stream=True).generate.remote(payload)
        try:
            first = await gen.__anext__()
        except Exception as e:  # no replica could take it, or its engine failed
            return error_response(503, f"model is unavailable: {e}", type_="service_unavailable")
        if "error" in first:
            gen.cancel()
            return error_response(400, first["error"], type_="invalid_request_error", code="invalid_request")
        rid = uuid.uuid4().hex
        headers = {"x-shardserve-replica": first["replica"]}  # which replica served it, for debugging
        if stream:
            return StreamingResponse(
                self._sse(first, gen, shape, rid, include_usage), media_type="text/event-stream", headers=headers
            )
        items = [first] + [item async for item in gen]
        return JSONResponse(shape.full(items, rid, self.model_name, self.created), headers=headers)

    async def _sse(self, first: dict, gen, shape, rid: str, include_usage: bool) -> AsyncIterator[str]:
        last = first
        yield f"data: {json.dumps(shape.chunk(first, rid, self.model_name, self.created, first=True))}\n\n"
        async for item in gen:
            last = item
            yield f"data: {json.dumps(shape.chunk(item, rid, self.model_name, self.created))}\n\n"
        if include_usage:
            yield f"data: {json.dumps(shape.usage_chunk(last, rid, self.model_name, self.created))}\n\n"
        yield "data: [DONE]\n\n"

    # -- routes -------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request):
        if (refusal := self._refuse(request, None)) is not None:
            return refusal
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "shardserve"}
        return {"object": "list", "data": [card]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        req = await self._parse(request, ChatCompletionRequest)
        if isinstance(req, JSONResponse):
            return req
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        payload = {
            "prompt": [m.model_dump() for m in req.messages],
            "sampling": _sampling(req, req.max_completion_tokens or req.max_tokens, logprobs),
        }
        return await self._run(payload, ChatShape, req)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        req = await self._parse(request, CompletionRequest)
        if isinstance(req, JSONResponse):
            return req
        payload = {"prompt": req.prompt, "raw": True, "sampling": _sampling(req, req.max_tokens, req.logprobs)}
        return await self._run(payload, CompletionShape, req)
