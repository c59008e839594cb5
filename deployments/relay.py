"""Relay: the ingress that holds every stream, so that a replica's death does not end it.

With ``replica_failover`` on (the default), clients talk to the Relay (through HAProxy or Serve's
proxy), and the Relay passes each request to an LLMServer replica through a deployment handle,
over Serve's gRPC transport, picked by the deployment's request router (the prefix-affinity one
by default). Each streamed delta comes back
with the tokens it carries (LLMServer.relay), so the Relay knows what every choice has delivered.
When the replica's process dies mid-answer (a crash, an out-of-memory kill, its node lost), the
Relay sends the same request to another replica, or to the replacement Serve starts, with those
tokens (a Resume per choice): the new replica prefills them with the prompt, replays them without
sending them again, and goes on. The client sees one stream. Sampling draws per (seed, step), so
greedy and seeded answers equal an undisturbed run's.

Bounded: a request lives through at most ``max_migrations`` replica failures and waits for a
replica at most ``recovery_timeout_s`` in all; past either, a stream ends with an OpenAI error
event and ``[DONE]``, an answer not yet begun gets 503 with Retry-After.

It is one process more on each token's way; over Serve's gRPC transport that measured no cost
here, over Ray object references it cost 19% of throughput under load (BENCHMARKS.md).
"""
# No `from __future__ import annotations`: see deployments/router.py.

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from cluster.protocol import Resume
from deployments import openai_schema
from deployments.grpc_protocol import grpc_authorization, grpc_prompt, set_grpc_error
from deployments.openai_protocol import error_response, install_error_handlers, read_body, sse_error
from deployments.proto import shardserve_pb2 as pb
from deployments.protocol import RelayCall, RequestError
from deployments.request_router import RoutingRequest
from deployments.router import routing_request

HEALTH_TIMEOUT_S = 2.0  # a replica that does not answer a health question in this long is not serving

log = logging.getLogger("shardserve")
relay_api = FastAPI(title="shardserve", description="OpenAI-compatible API of a sharded LLM on Ray")
relay_api.openapi = lambda: openai_schema.openapi(relay_api)
install_error_handlers(relay_api)


async def _sse(answer: AsyncIterator[str]) -> AsyncIterator[str]:
    """The SSE events of a relayed answer; when it fails, an error event and [DONE], never a cut stream."""
    try:
        async for text in answer:
            if text:
                yield text
    except RequestError as e:
        yield sse_error(e)
    finally:
        await answer.aclose()


@serve.ingress(relay_api)
class Relay:
    def __init__(self, server: DeploymentHandle, max_migrations: int, recovery_timeout_s: float, max_body_bytes: int):
        server._init()  # start the handle's request router now, not on the first request
        # Calls go to the replicas over gRPC, each streamed item in the reply, not as Ray objects.
        self.server = server.options(_by_reference=False)
        self.max_migrations, self.recovery_timeout_s = max_migrations, recovery_timeout_s
        self.max_body_bytes = max_body_bytes

    async def _follow(self, start, rid: str) -> AsyncIterator:
        """A relayed answer as it comes: the first replica's head, then the payload of every item of its
        stream (items are (payload, choice, token ids, finish reason)). When the replica dies, or none
        answers, ``start(resume)`` again with what each choice delivered, until max_migrations replica
        failures or recovery_timeout_s; then RequestError (replica_failed). A refusal, as a head or an
        item, is raised too."""
        deadline = time.monotonic() + self.recovery_timeout_s
        delivered: dict[int, list[int]] = {}  # choice -> the tokens the client has (or that are held back for it)
        finished: dict[int, str] = {}
        failures, began = 0, False
        while True:
            resume = {i: Resume(tuple(ids), finished.get(i)) for i, ids in delivered.items()} or None
            stream = start(resume)
            try:
                head = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
                if isinstance(head, RequestError):
                    raise head
                if not began:
                    began = True
                    yield head
                elif resume:
                    log.info("request %s resumed on another replica, %d tokens delivered", rid,
                             sum(len(ids) for ids in delivered.values()))  # fmt: skip
                async for item in stream:
                    if isinstance(item, RequestError):
                        raise item
                    payload, index, token_ids, finish_reason = item
                    if index is not None:
                        delivered.setdefault(index, []).extend(token_ids)
                        if finish_reason is not None:
                            finished[index] = finish_reason
                    yield payload
                return
            except (RayActorError, asyncio.TimeoutError) as e:
                failures += 1
                log.warning("request %s: replica lost (%s), failure %d", rid, type(e).__name__, failures)
                if failures > self.max_migrations or time.monotonic() >= deadline:
                    why = (f"past max_migrations ({self.max_migrations})" if failures > self.max_migrations
                           else f"no replica within recovery_timeout_s ({self.recovery_timeout_s:g} s)")  # fmt: skip
                    raise RequestError.unavailable(f"the model's replicas failed while answering, {why} "
                                                   f"(request id {rid}); retry", retry_after=1,
                                                   code="replica_failed") from None  # fmt: skip
            finally:
                stream.cancel()  # the answer is over, the client went away, or the replica is gone

    async def _answer(self, request: Request, route: str):
        try:
            body = await read_body(request, self.max_body_bytes)
        except RequestError as e:
            return error_response(e)
        call = RelayCall(route, request.headers.get("authorization"), body, uuid.uuid4().hex, int(time.time()))
        routing = routing_request(body)
        relay = self.server.options(stream=True).relay
        answer = self._follow(lambda resume: relay.remote(routing, dataclasses.replace(call, resume=resume)), call.rid)
        try:
            head = await answer.__anext__()
        except RequestError as e:
            return error_response(e, {"x-request-id": call.rid})
        if head.body is not None:
            await answer.aclose()
            return JSONResponse(head.body, headers=head.headers)
        return StreamingResponse(_sse(answer), media_type="text/event-stream", headers=head.headers)

    async def _ask(self, path: str, authorization: str | None) -> dict | RequestError:
        """A replica's answer to a GET of /health, /v1/models or /v1/models/{id}: the body, or the refusal
        (503 no_replica when none answers in time)."""
        try:
            return await asyncio.wait_for(self.server.relay_get.remote(path, authorization), HEALTH_TIMEOUT_S)
        except (RayActorError, asyncio.TimeoutError):
            # None running, or every one holding as many requests as Serve lets it (then the answer waits too).
            return RequestError.unavailable(f"no replica answered within {HEALTH_TIMEOUT_S:g} s (none running, or all "
                                            "full); retry", retry_after=1, code="no_replica")  # fmt: skip

    async def _get(self, request: Request, path: str):
        answer = await self._ask(path, request.headers.get("authorization"))
        return error_response(answer) if isinstance(answer, RequestError) else answer

    # -- gRPC (the RPC names of deployments/proto/shardserve.proto), relayed the same way --------------
    async def _grpc_answer(self, method: str, request: pb.GenerateRequest, grpc_context):
        """The messages of a Generate (one) or GenerateStream answer; a refusal or a failure sets the
        gRPC code and raises (Serve reports a code only with an exception when no message was sent)."""
        rid, authorization = uuid.uuid4().hex, grpc_authorization(grpc_context)
        routing, relay = RoutingRequest.of(grpc_prompt(request)), self.server.options(stream=True).relay_grpc
        # Generate sends nothing before its one message: a new replica starts it again from the beginning.
        answer = self._follow(lambda resume: relay.remote(routing, method, request, authorization, rid, resume), rid)
        try:
            await answer.__anext__()  # the head: taken
            async for message in answer:
                yield message
        except RequestError as e:
            set_grpc_error(grpc_context, e)
            raise

    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        try:
            return [m async for m in self._grpc_answer("Generate", request, grpc_context)][0]
        except RequestError:
            return pb.GenerateResponse()

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        async for message in self._grpc_answer("GenerateStream", request, grpc_context):
            yield message

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context) -> pb.ListModelsResponse:
        answer = await self._ask("/v1/models", grpc_authorization(grpc_context))
        if isinstance(answer, RequestError):
            set_grpc_error(grpc_context, answer)
            return pb.ListModelsResponse()
        return pb.ListModelsResponse(models=[pb.ModelCard(id=m["id"], created=m["created"], owned_by=m["owned_by"])
                                             for m in answer["data"]])  # fmt: skip

    async def Health(self, request: pb.HealthRequest, grpc_context) -> pb.HealthResponse:
        answer = await self._ask("/health", None)
        if isinstance(answer, RequestError):  # 503: UNAVAILABLE
            set_grpc_error(grpc_context, answer)
            return pb.HealthResponse(status=answer.code or "unavailable")
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
