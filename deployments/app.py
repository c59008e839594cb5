"""build_app(config) -> Application: the one builder used by `serve run`, `shardserve serve` and the tests.

By default (``replica_failover``) the Relay (deployments/relay.py) is the ingress, behind HAProxy
or Serve's proxy alike: it passes each request to an LLMServer replica through a handle (the
prefix-affinity request router picks it) and holds the stream, so that a replica's death does not
end it.

With ``replica_failover: false`` the LLMServer replicas are the ingress: each answers HTTP and
gRPC itself. With HAProxy in front (``RAY_SERVE_ENABLE_HA_PROXY=1`` in the environment of Ray and
of the process that builds the app, as ``shardserve serve`` and the manifests set it), the Router
picks the replica for every request and the tokens stream from the replica through HAProxy alone.
Without it, Serve's proxy forwards to the replicas and prefix affinity falls back to load
balancing, since the proxy hands routing no request body.
"""

from __future__ import annotations

import os
from pathlib import Path

from ray import serve
from ray.serve import Application
from ray.serve.config import gRPCOptions

from deployments.config import AppConfig, Listeners, parse_app_config
from deployments.llm_server import llm_server_deployment
from deployments.placement import ROUTER_CPUS
from deployments.relay import Relay
from deployments.router import Router
from model.sources import DEFAULT_MODEL, HUB_ID

GRPC_SERVICER = "deployments.proto.shardserve_pb2_grpc.add_ShardServeServicer_to_server"
def haproxy_enabled() -> bool:
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1"  # Ray Serve reads it when it is imported


def grpc_options(listeners: Listeners) -> gRPCOptions | None:
    """Serve's gRPC proxy settings for these listeners; None when gRPC is off."""
    if listeners.grpc_port is None:
        return None
    return gRPCOptions(port=listeners.grpc_port, grpc_servicer_functions=[GRPC_SERVICER])


def served_name(config: AppConfig) -> str:
    if config.served_model_name:
        return config.served_model_name
    if config.model is None:
        return DEFAULT_MODEL
    path = Path(config.model)
    if not path.exists() and HUB_ID.match(config.model):  # a Hub model ID is served under its name, as vLLM does
        return config.model.partition("@")[0]
    return path.stem if path.suffix == ".gguf" else path.name


def build_app(args: AppConfig | dict) -> Application:
    config = args if isinstance(args, AppConfig) else parse_app_config(args or {}, "application args")
    # Replica count and autoscaling are deployment options; keeping them out of the replicas'
    # constructor arguments means a change to them alone does not change what a replica is built from.
    replica_args = config.model_copy(update={"num_replicas": 1, "autoscaling": None})
    server = llm_server_deployment(config).bind(replica_args, served_name(config))
    if config.replica_failover:  # the Relay is the ingress, through HAProxy or Serve's proxy alike
        relay = serve.deployment(Relay, name="Relay", ray_actor_options={"num_cpus": ROUTER_CPUS},
                                 max_ongoing_requests=1000)  # fmt: skip
        return relay.bind(server, config.max_migrations, config.recovery_timeout_s, config.max_request_body_bytes)
    if not haproxy_enabled():
        return server
    router = serve.deployment(Router, name="Router", ray_actor_options={"num_cpus": ROUTER_CPUS},
                              max_ongoing_requests=1000)  # fmt: skip
    return server._with_ingress_request_router(router.bind(server))
