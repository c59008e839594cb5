"""Relay: the ingress that holds every stream, so that a replica's death does not end it.

With ``replica_failover`` on, clients talk to the Relay (through HAProxy or Serve's proxy), and the
Relay passes each request to an LLMServer replica through a deployment handle, picked by the
deployment's request router (the prefix-affinity one by default). Each streamed delta comes back
with the tokens it carries (LLMServer.relay), so the Relay knows what every choice has delivered.
When the replica's process dies mid-answer (a crash, an out-of-memory kill, its node lost), the
Relay sends the same request to another replica, or to the replacement Serve starts, with those
tokens (a Resume per choice): the new replica prefills them with the prompt, replays them without
sending them again, and goes on. The client sees one stream. Sampling draws per (seed, step), so
greedy and seeded answers equal an undisturbed run's.

Bounded: a request lives through at most ``max_migrations`` replica failures and waits for a
replica at most ``recovery_timeout_s`` in all; past either, a stream ends with an OpenAI error
event and ``[DONE]``, an answer not yet begun gets 503 with Retry-After.

The price is one process more on each token's way (BENCHMARKS.md measures it).
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
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from cluster.protocol import Resume
from deployments import openai_schema
from deployments.grpc_protocol import GRPC_STATUS, grpc_authorization, grpc_prompt
from deployments.openai_protocol import error_response, install_error_handlers, read_body
from deployments.proto import shardserve_pb2 as pb
from deployments.protocol import RelayCall, RelayHead, RequestError
from deployments.request_router import RoutingRequest
from deployments.router import routing_request

HEALTH_TIMEOUT_S = 2.0  # a replica that does not answer a health question in this long is not serving

log = logging.getLogger("shardserve")
relay_api = FastAPI(title="shardserve", description="OpenAI-compatible API of a sharded LLM on Ray")
relay_api.openapi = lambda: openai_schema.openapi(relay_api)
install_error_handlers(relay_api)


class ReplicaLost(Exception):
    """The replica serving a request died, or none could be had in time."""


@serve.ingress(relay_api)
class Relay:
    def __init__(self, server: DeploymentHandle, max_migrations: int, recovery_timeout_s: float, max_body_bytes: int):
        self.server, self.max_migrations, self.recovery_timeout_s = server, max_migrations, recovery_timeout_s
        self.max_body_bytes = max_body_bytes
        self.server._init()  # start the handle's request router now, not on the first request

    async def _open(self, call: RelayCall, routing, deadline: float):
        """A replica's answer to the call: its head and, when it streams, the rest. ReplicaLost when
        the replica dies first or none answers before the deadline."""
        stream = self.server.options(stream=True).relay.remote(routing, call)
        try:
            head = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
        except (RayActorError, asyncio.TimeoutError) as e:
            stream.cancel()
            raise ReplicaLost(type(e).__name__) from None
        return head, stream

    async def _answer(self, request: Request, route: str):
        try:
            body = await read_body(request, self.max_body_bytes)
        except RequestError as e:
            return error_response(e)
        call = RelayCall(route, request.headers.get("authorization"), body, uuid.uuid4().hex, int(time.time()))
        routing = routing_request(body)
        deadline = time.monotonic() + self.recovery_timeout_s
        failures = 0
        while True:
            try:
                head, stream = await self._open(call, routing, deadline)
                if head.body is not None:
                    return JSONResponse(head.body, status_code=head.status, headers=head.headers)
                return StreamingResponse(self._relay_stream(call, routing, stream, failures, deadline),
                                         media_type="text/event-stream", headers=head.headers)  # fmt: skip
            except ReplicaLost as e:  # nothing was sent yet: ask again, from the start
                failures += 1
                log.warning("request %s: replica lost before answering (%s), failure %d", call.rid, e, failures)
                if failures > self.max_migrations or time.monotonic() >= deadline:
                    return error_response(self._gone(call.rid, failures), {"x-request-id": call.rid})

    async def _relay_stream(self, call: RelayCall, routing, stream, failures: int, deadline: float) -> AsyncIterator[str]:
        delivered: dict[int, list[int]] = {}  # choice -> its tokens the client has (or that are held back for it)
        finished: dict[int, str] = {}
        try:
            while True:
                try:
                    async for text, index, token_ids, finish_reason in stream:
                        if index is not None:
                            delivered.setdefault(index, []).extend(token_ids)
                            if finish_reason is not None:
                                finished[index] = finish_reason
                        if text:
                            yield text
                    return
                except RayActorError as e:
                    failures += 1
                    log.warning("request %s: replica lost mid-stream (%s), failure %d", call.rid, type(e).__name__, failures)
                resume = {i: Resume(tuple(ids), finished.get(i)) for i, ids in delivered.items()}
                call = dataclasses.replace(call, resume=resume)
                while True:
                    if failures > self.max_migrations or time.monotonic() >= deadline:
                        yield f"data: {json.dumps(self._gone(call.rid, failures).body())}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    try:
                        head, stream = await self._open(call, routing, deadline)
                        break
                    except ReplicaLost as e:
                        failures += 1
                        log.warning("request %s: replica lost before resuming (%s), failure %d", call.rid, e, failures)
                if head.status != 200:  # the new replica refuses it (draining, busy): say so, and end
                    yield f"data: {json.dumps(head.body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                log.info("request %s resumed on another replica with %d tokens delivered", call.rid,
                         sum(len(ids) for ids in delivered.values()))  # fmt: skip
        finally:
            stream.cancel()  # the client went away, or the answer is over: the replica lets go of it

    def _gone(self, rid: str, failures: int) -> RequestError:
        why = (f"past max_migrations ({self.max_migrations})" if failures > self.max_migrations
               else f"no replica within recovery_timeout_s ({self.recovery_timeout_s:g} s)")  # fmt: skip
        return RequestError.unavailable(f"the model's replicas failed while answering, {why} (request id {rid}); "
                                        "retry", retry_after=1, code="replica_failed")  # fmt: skip

    async def _ask(self, path: str, authorization: str | None) -> RelayHead:
        """A replica's answer to a GET of /health, /v1/models or /v1/models/{id}; 503 when none answers in time."""
        try:
            return await asyncio.wait_for(self.server.relay_get.remote(path, authorization), HEALTH_TIMEOUT_S)
        except (RayActorError, asyncio.TimeoutError):
            e = RequestError.unavailable("no replica can serve now; retry", retry_after=1, code="no_replica")
            return RelayHead.error(e, {})

    async def _get(self, request: Request, path: str):
        head = await self._ask(path, request.headers.get("authorization"))
        return JSONResponse(head.body, status_code=head.status, headers=head.headers)

    # -- gRPC (the RPC names of deployments/proto/shardserve.proto), relayed the same way --------------
    async def _grpc_open(self, method: str, request: pb.GenerateRequest, authorization, rid: str, resume, deadline):
        """A replica's answer: None (taken) or its refusal, and the rest. ReplicaLost as _open."""
        stream = self.server.options(stream=True).relay_grpc.remote(RoutingRequest(grpc_prompt(request)), method,
                                                                    request, authorization, rid, resume)  # fmt: skip
        try:
            head = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
        except (RayActorError, asyncio.TimeoutError) as e:
            stream.cancel()
            raise ReplicaLost(type(e).__name__) from None
        return head, stream

    def _grpc_refuse(self, grpc_context, e: RequestError) -> RequestError:
        grpc_context.set_code(GRPC_STATUS[e.status])
        grpc_context.set_details(e.message)
        return e

    async def _grpc_answer(self, method: str, request: pb.GenerateRequest, grpc_context):
        """The messages of a Generate (one) or GenerateStream answer, resumed on another replica when
        its replica dies; a refusal or a failure sets the gRPC code and raises (Serve reports a code
        only with an exception when no message was sent)."""
        rid, authorization = uuid.uuid4().hex, grpc_authorization(grpc_context)
        deadline = time.monotonic() + self.recovery_timeout_s
        delivered: list[int] = []
        failures, stream = 0, None
        try:
            while True:
                # Generate sends nothing before its one message: it starts again from the beginning.
                resume = Resume(tuple(delivered)) if delivered else None
                try:
                    head, stream = await self._grpc_open(method, request, authorization, rid, resume, deadline)
                    if head is not None:
                        raise self._grpc_refuse(grpc_context, head)
                    async for item in stream:
                        if isinstance(item, RequestError):
                            raise self._grpc_refuse(grpc_context, item)
                        message, token_ids, _ = item
                        delivered += token_ids
                        yield message
                    return
                except (ReplicaLost, RayActorError) as e:
                    failures += 1
                    log.warning("request %s: replica lost (%s), failure %d", rid, type(e).__name__, failures)
                    if failures > self.max_migrations or time.monotonic() >= deadline:
                        raise self._grpc_refuse(grpc_context, self._gone(rid, failures)) from None
        finally:
            if stream is not None:
                stream.cancel()

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        try:
            return [m async for m in self._grpc_answer("Generate", request, grpc_context)][0]
        except RequestError:
            return pb.GenerateResponse()

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        async for message in self._grpc_answer("GenerateStream", request, grpc_context):
            yield message

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context) -> pb.ListModelsResponse:
        head = await self._ask("/v1/models", grpc_authorization(grpc_context))
        if head.status != 200:
            self._grpc_refuse(grpc_context, RequestError(head.status, head.body["error"]["message"], type_=""))
            return pb.ListModelsResponse()
        return pb.ListModelsResponse(models=[pb.ModelCard(id=m["id"], created=m["created"], owned_by=m["owned_by"])
                                             for m in head.body["data"]])  # fmt: skip

    async def Health(self, request: pb.HealthRequest, grpc_context) -> pb.HealthResponse:
        head = await self._ask("/health", None)
        if head.status != 200:
            grpc_context.set_code(grpc.StatusCode.UNAVAILABLE)
            grpc_context.set_details(head.body["error"]["message"])
            return pb.HealthResponse(status=head.body["error"]["code"] or "unavailable")
        return pb.HealthResponse(status="ok")

    # -- HTTP routes --------------------------------------------------------------------------------
    @relay_api.get("/health")
    async def health(self, request: Request):
        """200 when a replica would serve a request; 503 with the reason when none would."""
        return await self._get(request, "/health")

    @relay_api.get("/v1/models")
    async def models(self, request: Request):
        return await self._get(request, "/v1/models")

    @relay_api.get("/v1/models/{model_id:path}")
    async def model(self, request: Request, model_id: str):
        return await self._get(request, f"/v1/models/{model_id}")

    @relay_api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._answer(request, "/v1/chat/completions")

    @relay_api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, "/v1/completions")
