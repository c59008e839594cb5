"""LLMServer: one Serve replica = one engine (and its gang), and the ingress that serves it.

The replica answers HTTP (the OpenAI-compatible API) and gRPC itself: it authenticates,
validates the body with the pydantic models of deployments/openai_protocol.py, starts the
request on its engine and waits for the first delta, so that any refusal is known before a byte
is sent; then the deltas stream out as SSE chunks or gRPC messages from this process. Tokens
cross no other process on their way out: in HAProxy mode (``RAY_SERVE_ENABLE_HA_PROXY=1``, what
``shardserve serve`` and the manifests run) HAProxy forwards each request straight to the
replica that the Router (deployments/router.py) picks; otherwise Serve's proxy forwards it.

Besides serving, a replica reports its engine's state: as metrics (deployments/metrics.py), as
the autoscaling signal (``record_autoscaling_stats``, deployments/autoscaling.py) and as the
load the Router balances on (``record_routing_stats``).
"""
# No `from __future__ import annotations`: see deployments/router.py.

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.util import get_current_placement_group

from cluster.engine import LLMEngine
from cluster.protocol import EngineDeadError, GenerateRequest, InvalidRequestError, RequestOutput
from deployments.autoscaling import engine_utilization
from deployments.config import AppConfig, AutoscalingConfig
from deployments.grpc_protocol import GRPC_STATUS, grpc_request_body, grpc_response
from deployments.metrics import ReplicaMetrics, RequestTimer, RouterMetrics
from deployments.openai_protocol import (ChatCompletionRequest, ChatShape, CompletionRequest, CompletionShape,
                                         chat_request, completion_request, error_response, validate)
from deployments.placement import replica_actor_options, replica_bundles, replica_engine_config
from deployments.proto import shardserve_pb2 as pb
from deployments.protocol import RequestError

METRICS_PERIOD_S = 2.0  # how often engine gauges are refreshed
ROUTING_STATS_PERIOD_S = 0.5  # how often the Router learns each replica's load

api = FastAPI(title="shardserve", description="OpenAI-compatible API of a sharded LLM on Ray")


@serve.ingress(api)
class LLMServer:
    def __init__(self, config: AppConfig, model_name: str):
        self.engine = LLMEngine(replica_engine_config(config), pg=get_current_placement_group(), bundle_offset=1)
        self.max_num_seqs = config.max_num_seqs
        self.max_queued_requests = config.max_queued_requests
        self.model_name = model_name
        self.api_key = config.api_key
        self.created = int(time.time())
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = ReplicaMetrics(model_name, self.replica)
        self.requests = RouterMetrics(model_name)
        self._report_task: asyncio.Task | None = None

    # -- engine state, for metrics, autoscaling and routing --------------------------------
    def _ensure_reporting(self) -> None:
        if self._report_task is None or self._report_task.done():
            self._report_task = asyncio.get_running_loop().create_task(self._report())

    async def _report(self) -> None:
        while True:
            self.metrics.engine(self.engine.stats(), self.max_num_seqs)
            await asyncio.sleep(METRICS_PERIOD_S)

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"engine_utilization": engine_utilization(self.engine.stats(), self.max_num_seqs)}

    def record_routing_stats(self) -> dict[str, int]:
        stats = self.engine.stats()
        return {"running": stats.running, "waiting": stats.waiting}

    async def check_health(self) -> None:
        self._ensure_reporting()  # metrics flow from the first health check on, before any request
        await self.engine.check_health()  # raises when the gang is broken, so Serve replaces us

    async def __del__(self):
        if self._report_task is not None:
            self._report_task.cancel()
        await self.engine.shutdown()

    # -- checks and the start of a request, shared by HTTP and gRPC -------------------------
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

    async def _start(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """The request's deltas, once the first is there: what cannot run is refused before any is sent."""
        self._ensure_reporting()
        if 0 <= self.max_queued_requests <= self.engine.stats().waiting:
            raise RequestError(429, "server is busy, retry later", type_="rate_limit_error", code="queue_full")
        timer = RequestTimer(self.metrics, time.monotonic())
        stream = self.engine.generate(request)
        try:
            first = await stream.__anext__()
        except InvalidRequestError as e:
            raise RequestError.invalid(str(e), code="invalid_request") from None
        except EngineDeadError as e:
            raise RequestError.unavailable(f"model is unavailable: {e}") from None
        except BaseException:  # cancelled while waiting: the engine drops the request
            await stream.aclose()
            raise

        async def outputs() -> AsyncIterator[RequestOutput]:
            item = first
            try:
                while True:
                    timer.tokens(time.monotonic(), len(item.token_ids))
                    if item.finished:
                        timer.finished(time.monotonic(), item.prompt_tokens)
                    yield item
                    if item.finished:
                        return
                    item = await stream.__anext__()
            finally:  # the client went away, or the stream ended: either way the engine lets go of it
                await stream.aclose()

        return outputs()

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "shardserve"}

    # -- HTTP -------------------------------------------------------------------------------
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
        return validate(body, model_cls)

    async def _respond(self, request: Request, model_cls, to_request, shape):
        route = request.url.path
        try:
            req = await self._http_request(request, model_cls)
            outputs = await self._start(to_request(req))
        except RequestError as e:
            self.requests.request(route, e.status)
            return error_response(e)
        self.requests.request(route, 200)
        rid = uuid.uuid4().hex
        headers = {"x-shardserve-replica": self.replica}  # which replica served it, for debugging
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
            self.requests.request("/v1/models", e.status)
            return error_response(e)
        self.requests.request("/v1/models", 200)
        return {"object": "list", "data": [self._model_card()]}

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._respond(request, ChatCompletionRequest, chat_request, ChatShape)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._respond(request, CompletionRequest, completion_request, CompletionShape)

    # -- gRPC (method names are the RPC names in deployments/proto/shardserve.proto) ---------
    async def _grpc_start(self, request: pb.GenerateRequest, grpc_context, route: str) -> AsyncIterator[RequestOutput]:
        try:
            self._authorize(dict(grpc_context.invocation_metadata()).get("authorization"))
            body, model_cls = grpc_request_body(request, self.model_name)
            self._check_model(body["model"])
            req = validate(body, model_cls)
            outputs = await self._start(chat_request(req) if model_cls is ChatCompletionRequest else completion_request(req))
        except RequestError as e:
            self._grpc_refuse(grpc_context, e, route)
            raise
        self.requests.request(route, grpc.StatusCode.OK.name)
        return outputs

    def _grpc_refuse(self, grpc_context, e: RequestError, route: str) -> None:
        grpc_context.set_code(GRPC_STATUS[e.status])
        grpc_context.set_details(e.message)
        self.requests.request(route, GRPC_STATUS[e.status].name)

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        try:
            outputs = await self._grpc_start(request, grpc_context, "Generate")
        except RequestError:
            return pb.GenerateResponse()
        items = [item async for item in outputs]
        return grpc_response(items, uuid.uuid4().hex, self.model_name)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        # With no message sent, Serve only reports a code that comes with an exception, so a refusal propagates.
        outputs = await self._grpc_start(request, grpc_context, "GenerateStream")
        rid = uuid.uuid4().hex
        async for item in outputs:
            yield grpc_response([item], rid, self.model_name)

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context) -> pb.ListModelsResponse:
        try:
            self._authorize(dict(grpc_context.invocation_metadata()).get("authorization"))
        except RequestError as e:
            self._grpc_refuse(grpc_context, e, "ListModels")
            return pb.ListModelsResponse()
        self.requests.request("ListModels", grpc.StatusCode.OK.name)
        card = self._model_card()
        return pb.ListModelsResponse(models=[pb.ModelCard(id=card["id"], created=card["created"], owned_by=card["owned_by"])])

    async def Health(self, request: pb.HealthRequest, grpc_context) -> pb.HealthResponse:
        return pb.HealthResponse(status="ok")


def serve_autoscaling_config(a: AutoscalingConfig) -> dict:
    """The config's autoscaling block in Serve's terms."""
    out = {
        "min_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
        "look_back_period_s": a.look_back_period_s,
    }
    if a.metric == "engine_utilization":
        out["policy"] = {
            "policy_function": "deployments.autoscaling:EngineUtilizationPolicy",
            "policy_kwargs": {"target_utilization": a.target_engine_utilization},
        }
    return out


def llm_server_deployment(config: AppConfig):
    options = dict(
        name="LLMServer",
        placement_group_bundles=replica_bundles(config),
        placement_group_strategy=config.parallel.placement_strategy,
        ray_actor_options=replica_actor_options(config),
        max_ongoing_requests=config.max_num_seqs * 2,
        max_queued_requests=config.max_queued_requests,
        health_check_period_s=10,
    )
    if config.routing == "prefix_affinity":
        options["request_router_config"] = {
            "request_router_class": "deployments.request_router:PrefixAffinityRouter",
            # "Much busier" than the least-loaded replica: a quarter of a full batch more.
            "request_router_kwargs": {"max_imbalance": max(1, config.max_num_seqs // 4)},
            "request_routing_stats_period_s": ROUTING_STATS_PERIOD_S,
        }
    if config.autoscaling is not None:
        options["autoscaling_config"] = serve_autoscaling_config(config.autoscaling)
    else:
        options["num_replicas"] = config.num_replicas
    return serve.deployment(LLMServer, **options)
