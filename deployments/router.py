"""Router: picks the LLMServer replica for each request when HAProxy fronts the replicas.

In HAProxy mode HAProxy asks the Router (``POST /internal/route`` with the request body) which
replica should serve a request, then forwards the request straight to that replica's own HTTP
port, so the tokens stream from the replica to the client through HAProxy alone. The pick is
the LLMServer deployment's request router (deployments/request_router.py: the replica that
holds the prompt's prefix in its KV cache, unless it is much busier). The Router sees each body
once and sends nothing on; it is attached with Ray Serve's ingress-request-router hook, the one
Ray Serve LLM's direct streaming uses (an internal, unstable Serve API in Ray 2.60).
"""
# No `from __future__ import annotations` in the FastAPI modules: Serve's ingress wrapper reads the
# route signatures as written, and a string annotation makes `request: Request` a body field.

import json

from fastapi import FastAPI, HTTPException, Request
from ray import serve
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.request_router import RoutingRequest

router_api = FastAPI(title="shardserve router")


def routing_request(body: bytes) -> RoutingRequest | None:
    """The prompt of an OpenAI request body (chat messages or a completion prompt), or None."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError, RecursionError):
        # Truncated by HAProxy, not JSON, nested too deep: route it on load alone; the replica
        # answers what is wrong with it.
        return None
    if not isinstance(data, dict):
        return None
    prompt = data.get("messages") or data.get("prompt")
    return RoutingRequest.of(prompt) if isinstance(prompt, (str, list)) else None


@serve.ingress(router_api)
class Router:
    def __init__(self, server: DeploymentHandle):
        self.server = server
        self.server._init()  # start the handle's request router now, not on the first request

    @router_api.post("/internal/route")
    async def route(self, request: Request) -> dict:
        """HAProxy's contract: 200 with the chosen replica's host, port and id; anything else fails the request."""
        payload = routing_request(await request.body())
        try:
            # _reserve=False: the request goes out through HAProxy, not through this handle.
            async with self.server.choose_replica(*([payload] if payload else []), _reserve=False) as selection:
                replica = selection._replica
                if replica.backend_http_endpoint is None:
                    raise HTTPException(503, f"replica {selection.replica_id} has no HTTP endpoint yet")
                host, port = replica.backend_http_endpoint
                return {"host": host, "port": port, "replica_id": replica.replica_id.to_full_id_str()}
        except DeploymentUnavailableError as e:
            raise HTTPException(503, str(e)) from None

    @router_api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}
