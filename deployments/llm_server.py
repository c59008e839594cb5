"""LLMServer: one Serve replica = one engine (and its gang), and what it answers.

A replica authenticates, validates the body with the pydantic models of
deployments/openai_protocol.py, starts the request on its engine and waits for the first delta,
so that any refusal is known before a byte is sent; then the deltas go out as SSE chunks or gRPC
messages. By default they go to the Relay (deployments/relay.py: ``relay``, ``relay_grpc``,
``relay_get``), each with the tokens it carries, so that the Relay can resume the stream on another
replica if this one dies. With ``replica_failover: false`` the replica is the ingress and answers
HTTP and gRPC itself: in HAProxy mode (``RAY_SERVE_ENABLE_HA_PROXY=1``, what ``shardserve serve``
and the manifests run) HAProxy forwards each request straight to the replica that the Router
(deployments/router.py) picks; otherwise Serve's proxy forwards it.

Besides serving, a replica reports its engine's state: as metrics (deployments/metrics.py), as
the autoscaling signal (``record_autoscaling_stats``, deployments/autoscaling.py) and as the
load the request router balances on (``record_routing_stats``).
"""
# No `from __future__ import annotations`: see deployments/router.py.

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from typing import AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.util import get_current_placement_group

from cluster.engine import LLMEngine
from cluster.protocol import EngineDeadError, GenerateRequest, InvalidRequestError, RequestOutput, Resume
from deployments import drain, openai_schema
from deployments.admission import Admission
from deployments.autoscaling import engine_utilization
from deployments.config import AppConfig, AutoscalingConfig, read_api_key
from deployments.grpc_protocol import (GRPC_STATUS, grpc_authorization, grpc_request_body, grpc_response,
                                       set_grpc_error)
from deployments.metrics import ReplicaMetrics, RequestTimer, RouterMetrics
from deployments.openai_protocol import (ChatCompletionRequest, ChatShape, CompletionRequest, CompletionShape,
                                         chat_request, completion_request, error_response, install_error_handlers,
                                         parse_json, read_json, sse_error, tool_call_chunk, usage_of, validate,
                                         with_tool_calls)
from deployments.placement import replica_actor_options, replica_bundles, replica_engine_config
from deployments.proto import shardserve_pb2 as pb
from deployments.protocol import RelayCall, RelayHead, RequestError
from deployments.request_router import RoutingRequest
from deployments.tools import ToolCallStream, ToolSetup

METRICS_PERIOD_S = 2.0  # how often engine gauges are refreshed
ROUTING_STATS_PERIOD_S = 0.5  # how often the Router learns each replica's load
# Serve replaces a replica after 3 failed health checks in a row: a broken gang is replaced ~6 s
# after it broke (a health check is a ping to each worker).
HEALTH_CHECK_PERIOD_S = 2.0

log = logging.getLogger("shardserve")
api = FastAPI(title="shardserve", description="OpenAI-compatible API of a sharded LLM on Ray")


api.openapi = lambda: openai_schema.openapi(api)  # the bodies the routes read themselves, described


install_error_handlers(api)


SHAPES = {"/v1/chat/completions": ChatShape, "/v1/completions": CompletionShape}


def _include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


class _Deltas:
    """One request's deltas, the first already in hand. A model that fails on the way raises
    RequestError (503), its detail logged here. Closing it, begun or not (the client went away, a
    sibling choice failed), lets the engine drop the request, once."""

    def __init__(self, request_id: str, first: RequestOutput, stream, timer: RequestTimer, on_done, replay: bool):
        self.request_id, self._next, self._stream, self._timer, self._on_done = request_id, first, stream, timer, on_done
        self._closed = False
        self._replay = replay  # the first delta replays tokens another replica made: not counted again

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self._closed:
            raise StopAsyncIteration
        item, self._next = self._next, None
        if item is None:
            try:
                item = await self._stream.__anext__()
            except EngineDeadError as e:
                log.error("request %s: engine failed mid-request: %s", self.request_id, e)
                await self.aclose()
                raise RequestError.unavailable(f"the model failed while answering (request id {self.request_id}); "
                                               "retry", retry_after=1, code="engine_failed") from None  # fmt: skip
            except BaseException:
                await self.aclose()
                raise
        if not self._replay:
            self._timer.tokens(time.monotonic(), len(item.token_ids))
            if item.finished:
                self._timer.finished(time.monotonic(), item.prompt_tokens, item.finish_reason)
        self._replay = False
        if item.finished:
            await self.aclose()
        return item

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._on_done()
            await self._stream.aclose()


async def merge_streams(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The deltas of several choices as they come, tagged with the choice's index; the first error
    ends it all, and every stream is closed when the merge ends or is abandoned."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item))
            queue.put_nowait((index, done))
        except Exception as e:  # RequestError (the model failed): the merge raises it
            queue.put_nowait((index, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


class LLMServer:
    def __init__(self, config: AppConfig, model_name: str):
        self.api_key = config.api_key if config.api_key_file is None else read_api_key(config.api_key_file)
        self.engine = LLMEngine(replica_engine_config(config), pg=get_current_placement_group(), bundle_offset=1)
        self.max_num_seqs = config.max_num_seqs
        self.admission = Admission(config.max_num_seqs, config.max_queued_requests)
        self.max_body_bytes = config.max_request_body_bytes
        self.model_name = model_name
        self.created = int(time.time())
        self.tooling = ToolSetup.for_tokenizer(config.tool_call_parser, self.engine.tokenizer)
        context = serve.get_replica_context()
        self.app_name, self.replica = context.app_name, context.replica_id.unique_id
        self.metrics = ReplicaMetrics(model_name, self.replica)
        self.requests = RouterMetrics(model_name)
        self.in_flight = 0  # requests between their start and their last delta (or their failure)
        self.draining = False  # shardserve serve is stopping: finish what is here, take nothing new
        self._tasks: list[asyncio.Task] = []

    # -- engine state, for metrics, autoscaling and routing; the drain flag ----------------
    def _ensure_reporting(self) -> None:
        if not self._tasks or any(t.done() for t in self._tasks):
            for t in self._tasks:
                t.cancel()
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._report_metrics()), loop.create_task(self._watch_drain())]

    async def _report_metrics(self) -> None:
        while True:
            self.metrics.engine(self.engine.stats(), self.max_num_seqs)
            await asyncio.sleep(METRICS_PERIOD_S)

    async def _watch_drain(self) -> None:
        while True:  # the key-value store is a round trip to the GCS: off the event loop
            if not self.draining and await asyncio.to_thread(drain.drain_requested, self.app_name):
                self.draining = True
                log.info("replica %s is draining: %d requests in flight", self.replica, self.in_flight)
            if self.draining:
                await asyncio.to_thread(drain.report_in_flight, self.app_name, self.replica, self.in_flight)
            await asyncio.sleep(drain.DRAIN_POLL_S)

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"engine_utilization": engine_utilization(self.engine.stats(), self.max_num_seqs)}

    def record_routing_stats(self) -> dict[str, int]:
        stats = self.engine.stats()
        return {"running": stats.running, "waiting": stats.waiting}

    async def check_health(self) -> None:
        self._ensure_reporting()  # metrics flow from the first health check on, before any request
        await self.engine.check_health()  # raises when the gang is broken, so Serve replaces us

    async def __del__(self):
        for t in self._tasks:
            t.cancel()
        await self.engine.shutdown()

    def _unavailable_reason(self) -> RequestError | None:
        """Why this replica would not serve a request now, or None."""
        if self.draining:
            return RequestError.unavailable("server is shutting down", retry_after=1, code="draining")
        if self.engine.dead is not None:
            return RequestError.unavailable("model is unavailable: its engine failed; retry", retry_after=1,
                                            code="engine_failed")  # fmt: skip
        return None

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
        refusal = self._unavailable_reason()
        if refusal is not None:
            raise refusal
        stats = self.engine.stats()
        if not self.admission.admits(stats.running, stats.waiting):
            raise RequestError(429, "server is busy, retry later", type_="rate_limit_error", code="queue_full",
                               retry_after=self.admission.retry_after(stats.running, stats.waiting))  # fmt: skip
        timer = RequestTimer(self.metrics, time.monotonic())
        self.in_flight += 1
        stream = self.engine.generate(request)
        try:
            first = await stream.__anext__()
        except BaseException as e:
            self._done()
            await stream.aclose()
            if isinstance(e, InvalidRequestError):
                raise RequestError.invalid(str(e), code="invalid_request") from None
            if isinstance(e, EngineDeadError):
                log.error("request %s: engine unavailable: %s", request.request_id, e)
                raise RequestError.unavailable("model is unavailable; retry", retry_after=1,
                                               code="engine_failed") from None  # fmt: skip
            raise  # cancelled while waiting: the engine drops the request

        return _Deltas(request.request_id, first, stream, timer, self._done, replay=request.resume is not None)

    def _done(self) -> None:
        self.in_flight -= 1
        self.admission.finished()

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "shardserve"}

    # -- HTTP, straight from a client or relayed by the Relay -----------------------------
    async def _open(self, route: str, body: dict, rid: str, resume: dict | None = None):
        """The validated request, its plan and its started choices; raises RequestError to refuse it."""
        self._check_model(body.get("model"))
        if route == "/v1/chat/completions":
            req = validate(body, ChatCompletionRequest)
            plan = chat_request(req, self.tooling)
        else:
            req = validate(body, CompletionRequest)
            plan = completion_request(req, lambda ids: self.engine.tokenizer.decode(ids))  # echo of token-id prompts
        return req, plan, await self._start_all(plan.requests, rid, resume)

    async def _respond(self, request: Request, route: str):
        rid = uuid.uuid4().hex
        headers = {"x-request-id": rid, "x-shardserve-replica": self.replica}  # the replica, for debugging
        try:
            self._authorize(request.headers.get("authorization"))
            req, plan, outputs = await self._open(route, await read_json(request, self.max_body_bytes), rid)
        except RequestError as e:
            self.requests.request(route, e.status)
            return error_response(e, headers)
        self.requests.request(route, 200)
        shape = SHAPES[route]
        if req.stream:
            events = self._events(outputs, shape, rid, self.created, _include_usage(req), plan)
            return StreamingResponse((text async for text, _, _ in events if text), media_type="text/event-stream",
                                     headers=headers)  # fmt: skip
        try:
            body = await self._full(outputs, shape, rid, self.created, plan)
        except RequestError as e:  # the model failed mid-request
            return error_response(e, headers)
        return JSONResponse(body, headers=headers)

    async def relay(self, routing: RoutingRequest | None, call: RelayCall) -> AsyncIterator:
        """The Relay's way in (``replica_failover``): the answer the HTTP routes give, as items the
        Relay forwards: a RelayHead or the RequestError that refuses the request, then, streamed, one
        (SSE text, choice, token ids, finish reason) per event, so the Relay knows what each choice
        has delivered. ``routing`` is only for the request router (it reads the first argument)."""
        headers = {"x-request-id": call.rid, "x-shardserve-replica": self.replica}
        try:
            self._authorize(call.authorization)
            req, plan, outputs = await self._open(call.route, parse_json(call.body), call.rid, call.resume)
        except RequestError as e:
            self.requests.request(call.route, e.status)
            yield e
            return
        self.requests.request(call.route, 200)
        shape = SHAPES[call.route]
        if not req.stream:
            try:
                yield RelayHead(headers, await self._full(outputs, shape, call.rid, call.created, plan))
            except RequestError as e:
                yield e
            return
        yield RelayHead(headers, None)
        resumed = set(call.resume or ())
        async for text, index, item in self._events(outputs, shape, call.rid, call.created, _include_usage(req),
                                                    plan, resumed):  # fmt: skip
            yield text, index, item and item.token_ids, item and item.finish_reason

    async def _full(self, outputs, shape, rid: str, created: int, plan) -> dict:
        choices: list[list[RequestOutput]] = [[] for _ in plan.requests]
        async for index, item in outputs:
            choices[index].append(item)
        body = shape.full(choices, rid, self.model_name, created, plan)
        return with_tool_calls(body, plan.tool_format) if plan.tool_format else body

    async def _start_all(self, requests: list[GenerateRequest], rid: str,
                         resume: dict | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:  # fmt: skip
        """Every choice started, as one stream of (choice index, delta). The first runs alone until its
        first token: the others then find its prompt in the prefix cache instead of computing it again.
        ``resume`` maps a choice to what another replica already delivered of it (cluster.protocol.Resume)."""
        ids = [rid] if len(requests) == 1 else [f"{rid}-{i}" for i in range(len(requests))]
        resume = resume or {}
        requests = [dataclasses.replace(r, request_id=ids[i], resume=resume.get(i)) for i, r in enumerate(requests)]
        streams = [await self._start(requests[0])]
        rest = await asyncio.gather(*(self._start(r) for r in requests[1:]), return_exceptions=True)
        streams += [r for r in rest if not isinstance(r, BaseException)]
        refused = next((r for r in rest if isinstance(r, BaseException)), None)
        if refused is not None:  # all or nothing: let go of the choices that did start
            for stream in streams:
                await stream.aclose()
            raise refused
        return merge_streams(streams)

    async def _events(self, outputs: AsyncIterator[tuple[int, RequestOutput]], shape, rid: str, created: int,
                      include_usage: bool, plan, resumed: set[int] = frozenset()):  # fmt: skip
        """The SSE events of a streamed request, each as (text, choice index, delta). The text is empty
        for a delta with nothing to send yet (tool-call text held back) and for a resumed choice's first
        delta, the replay of what the client already has: both still move the choice's state on.
        The usage and [DONE] events come with no delta."""
        last: dict[int, RequestOutput] = {}
        tool_streams = {}
        try:
            async for index, item in outputs:
                first = index not in last
                prefix = plan.echo[index] if plan.echo and first else ""
                chunk = shape.chunk(item, index, rid, self.model_name, created, first=first, prefix=prefix)
                last[index] = item
                send = not (first and index in resumed)
                if plan.tool_format is not None:
                    stream = tool_streams.setdefault(index, ToolCallStream(plan.tool_format))
                    chunk = tool_call_chunk(chunk, stream, item)
                    delta = chunk["choices"][0]["delta"]
                    # text held back (it may begin a call): nothing to send for it yet
                    send = send and (first or delta["content"] or "tool_calls" in delta or item.finished)
                yield (f"data: {json.dumps(chunk)}\n\n" if send else ""), index, item
        except RequestError as e:  # the model failed mid-stream
            yield sse_error(e), None, None
            return
        if include_usage:
            usage = usage_of([last[i] for i in sorted(last)], plan.n)
            yield f"data: {json.dumps(shape.usage_chunk(usage, rid, self.model_name, created))}\n\n", None, None
        yield "data: [DONE]\n\n", None, None

    async def _health_refusal(self) -> RequestError | None:
        """None when this replica would serve a request now; otherwise why not."""
        refusal = self._unavailable_reason()
        if refusal is None and self.engine.recovering:  # requests are taken, and served once it is back
            refusal = RequestError.unavailable("a worker failed; a new one is starting", retry_after=1,
                                               code="recovering")  # fmt: skip
        if refusal is None:
            try:
                await self.engine.check_health()
            except Exception as e:
                log.error("health check failed: %s", e)
                refusal = RequestError.unavailable("model is unavailable: its engine failed", code="engine_failed")
        return refusal

    def _models(self, route: str, authorization: str | None, model_id: str | None = None) -> dict:
        """The model list, or one model's card; raises RequestError."""
        try:
            self._authorize(authorization)
            if model_id is not None:
                self._check_model(model_id)
        except RequestError as e:
            self.requests.request(route, e.status)
            raise
        self.requests.request(route, 200)
        return self._model_card() if model_id is not None else {"object": "list", "data": [self._model_card()]}

    async def relay_get(self, path: str, authorization: str | None) -> dict | RequestError:
        """The Relay's way in for /health, /v1/models and /v1/models/{id} (``replica_failover``)."""
        if path == "/health":
            return await self._health_refusal() or {"status": "serving"}
        try:
            if path == "/v1/models":
                return self._models(path, authorization)
            return self._models("/v1/models/{id}", authorization, path.removeprefix("/v1/models/"))
        except RequestError as e:
            return e

    @api.get("/health")
    async def health(self):
        """200 when this replica would serve a request; 503 with the reason when it would not."""
        refusal = await self._health_refusal()
        return {"status": "serving"} if refusal is None else error_response(refusal)

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            return self._models("/v1/models", request.headers.get("authorization"))
        except RequestError as e:
            return error_response(e)

    @api.get("/v1/models/{model_id:path}")
    async def model(self, request: Request, model_id: str):
        try:
            return self._models("/v1/models/{id}", request.headers.get("authorization"), model_id)
        except RequestError as e:
            return error_response(e)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._respond(request, "/v1/chat/completions")

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._respond(request, "/v1/completions")

    # -- gRPC (method names are the RPC names in deployments/proto/shardserve.proto) ---------
    async def _grpc_start(self, request: pb.GenerateRequest, authorization: str | None, route: str, rid: str,
                          resume: Resume | None = None) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """The deltas of a gRPC request; raises RequestError, which the caller reports (_grpc_refuse)."""
        self._authorize(authorization)
        body, model_cls = grpc_request_body(request, self.model_name)
        self._check_model(body["model"])
        req = validate(body, model_cls)
        plan = chat_request(req, self.tooling) if model_cls is ChatCompletionRequest else completion_request(req)
        outputs = await self._start(dataclasses.replace(plan.requests[0], request_id=rid, resume=resume))  # no n
        self.requests.request(route, grpc.StatusCode.OK.name)
        return outputs

    async def relay_grpc(self, routing: RoutingRequest | None, method: str, request: pb.GenerateRequest,
                         authorization: str | None, rid: str, resume: dict | None = None):  # fmt: skip
        """The Relay's way in for Generate and GenerateStream (``replica_failover``): first None (taken)
        or the RequestError that refuses it; then (message, 0, token ids, finish reason) per delta, or
        for Generate one such item with the whole answer (and no tokens: nothing was sent before it);
        a RequestError when the model fails on the way."""
        resume = (resume or {}).get(0)  # gRPC has one choice
        try:
            outputs = await self._grpc_start(request, authorization, method, rid, resume)
        except RequestError as e:
            self.requests.request(method, GRPC_STATUS[e.status].name)
            yield e
            return
        yield None
        try:
            if method == "Generate":
                yield grpc_response([item async for item in outputs], rid, self.model_name), 0, [], None
                return
            replay = resume is not None  # the first delta replays what the client has: not sent again
            async for item in outputs:
                if not replay:
                    yield grpc_response([item], rid, self.model_name), 0, item.token_ids, item.finish_reason
                replay = False
        except RequestError as e:
            yield e

    def _grpc_refuse(self, grpc_context, e: RequestError, route: str) -> None:
        set_grpc_error(grpc_context, e)
        self.requests.request(route, GRPC_STATUS[e.status].name)

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        rid = uuid.uuid4().hex
        try:
            outputs = await self._grpc_start(request, grpc_authorization(grpc_context), "Generate", rid)
            items = [item async for item in outputs]
        except RequestError as e:
            self._grpc_refuse(grpc_context, e, "Generate")
            return pb.GenerateResponse()
        return grpc_response(items, rid, self.model_name)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        # With no message sent, Serve only reports a code that comes with an exception, so a refusal propagates.
        # A model failing mid-stream ends it the same way, with UNAVAILABLE, not as if it were complete.
        rid = uuid.uuid4().hex
        try:
            outputs = await self._grpc_start(request, grpc_authorization(grpc_context), "GenerateStream", rid)
            async for item in outputs:
                yield grpc_response([item], rid, self.model_name)
        except RequestError as e:
            self._grpc_refuse(grpc_context, e, "GenerateStream")
            raise

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context) -> pb.ListModelsResponse:
        try:
            self._authorize(grpc_authorization(grpc_context))
        except RequestError as e:
            self._grpc_refuse(grpc_context, e, "ListModels")
            return pb.ListModelsResponse()
        self.requests.request("ListModels", grpc.StatusCode.OK.name)
        card = self._model_card()
        return pb.ListModelsResponse(models=[pb.ModelCard(id=card["id"], created=card["created"], owned_by=card["owned_by"])])

    async def Health(self, request: pb.HealthRequest, grpc_context) -> pb.HealthResponse:
        refusal = self._unavailable_reason()
        if refusal is not None:
            set_grpc_error(grpc_context, refusal)  # 503: UNAVAILABLE
            return pb.HealthResponse(status=refusal.code or "unavailable")
        return pb.HealthResponse(status="ok")


# The replica answering HTTP itself. Made once: serve.ingress rewrites the routes of `api` in place.
IngressLLMServer = serve.ingress(api)(LLMServer)


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


def max_ongoing_requests(config: AppConfig) -> int:
    """What Serve lets a replica hold: its batch, its queue and one more, so that the replica sees, and
    refuses with an OpenAI 429 and a Retry-After, the request past its queue (Serve's own refusal has
    neither). No queue limit: a second batch's worth waits in the replica."""
    if config.max_queued_requests < 0:
        return config.max_num_seqs * 2
    return config.max_num_seqs + config.max_queued_requests + 1


def llm_server_deployment(config: AppConfig):
    options = dict(
        name="LLMServer",
        placement_group_bundles=replica_bundles(config),
        placement_group_strategy=config.parallel.placement_strategy,
        ray_actor_options=replica_actor_options(config),
        max_ongoing_requests=max_ongoing_requests(config),
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        graceful_shutdown_timeout_s=config.drain_timeout_s,
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
    # Serve takes one FastAPI ingress per app: with the Relay in front, the replicas answer its handle calls only.
    return serve.deployment(LLMServer if config.replica_failover else IngressLLMServer, **options)
