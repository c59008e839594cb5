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


class ChatShape:
    @staticmethod
    def _logprobs(items: list[dict]) -> dict | None:
        entries = [lp for item in items for lp in item["logprobs"]]
        if not entries:
            return None
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

    @classmethod
    def full(cls, items: list[dict], rid: str, model: str, created: int) -> dict:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": "".join(i["text"] for i in items)},
            "finish_reason": items[-1]["finish_reason"],
            "logprobs": cls._logprobs(items),
        }
        return {
            "id": f"chatcmpl-{rid}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": _usage(items[-1]),
        }

    @classmethod
    def chunk(cls, item: dict, rid: str, model: str, created: int, first: bool = False) -> dict:
        delta = {"content": item["text"]}
        if first:
            delta["role"] = "assistant"
        choice = {"index": 0, "delta": delta, "finish_reason": item["finish_reason"], "logprobs": cls._logprobs([item])}
        return {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}  # fmt: skip

    @staticmethod
    def usage_chunk(item: dict, rid: str, model: str, created: int) -> dict:
        return {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [], "usage": _usage(item)}  # fmt: skip


class CompletionShape:
    @staticmethod
    def _logprobs(items: list[dict]) -> dict | None:
        entries = [lp for item in items for lp in item["logprobs"]]
        if not entries:
            return None
        return {
            "tokens": [lp["token"] for lp in entries],
            "token_logprobs": [lp["logprob"] for lp in entries],
            "top_logprobs": [dict(lp["top"]) for lp in entries],
        }

    @classmethod
    def full(cls, items: list[dict], rid: str, model: str, created: int) -> dict:
        choice = {
            "index": 0,
            "text": "".join(i["text"] for i in items),
            "finish_reason": items[-1]["finish_reason"],
            "logprobs": cls._logprobs(items),
        }
        return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model,
                "choices": [choice], "usage": _usage(items[-1])}  # fmt: skip

    @classmethod
    def chunk(cls, item: dict, rid: str, model: str, created: int, first: bool = False) -> dict:
        choice = {"index": 0, "text": item["text"], "finish_reason": item["finish_reason"],
                  "logprobs": cls._logprobs([item])}  # fmt: skip
        return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model,
                "choices": [choice]}  # fmt: skip

    @staticmethod
    def usage_chunk(item: dict, rid: str, model: str, created: int) -> dict:
        return {"id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": model,
                "choices": [], "usage": _usage(item)}  # fmt: skip


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
