"""build_app(config) -> Application: the one builder used by `serve run`, `shardserve serve` and the tests."""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application
from ray.serve.config import gRPCOptions

from deployments.config import AppConfig, Listeners, parse_app_config
from deployments.llm_server import llm_server_deployment
from deployments.router import Router
from model.sources import DEFAULT_MODEL


GRPC_SERVICER = "deployments.proto.shardserve_pb2_grpc.add_ShardServeServicer_to_server"


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
    return path.stem if path.suffix == ".gguf" else path.name


def build_app(args: AppConfig | dict) -> Application:
    config = args if isinstance(args, AppConfig) else parse_app_config(args or {}, "application args")
    # Replica count and autoscaling are deployment options; keeping them out of the replicas'
    # constructor arguments means a change to them alone does not change what a replica is built from.
    replica_args = config.model_copy(update={"num_replicas": 1, "autoscaling": None})
    server = llm_server_deployment(config).bind(replica_args, served_name(config))
    return Router.bind(server, config.api_key, served_name(config))
