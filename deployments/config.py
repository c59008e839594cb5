"""AppConfig: the one description of a shardserve deployment, validated when it is loaded.

The same YAML file is a Ray Serve config (``applications[0].args`` holds the
AppConfig), so ``serve run``, ``serve deploy``, ``shardserve`` and the KubeRay
``serveConfigV2`` all read one source of truth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.config import EngineConfig


# How Ray Serve runs shardserve (`shardserve serve` and the manifests set these in Ray's environment):
# HAProxy in front of the replicas, so tokens stream from the replica that makes them straight to
# the client (deployments/app.py); HAProxy shows the Router the first 256 KB of each body, which
# prefix affinity routes on (a longer, truncated body is balanced on load alone).
SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
    "RAY_SERVE_HAPROXY_INGRESS_REQUEST_ROUTER_BUFSIZE": str(256 * 1024),
    # The Relay calls replicas over gRPC, the request body inside: above Serve's 4 MiB default so a body
    # up to max_request_body_bytes (4 MiB by default) fits with its envelope.
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(256 << 20),
}


class AutoscalingConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    min_replicas: int = Field(1, ge=0, description="Fewest LLMServer replicas kept running.")
    max_replicas: int = Field(2, ge=1, description="Most LLMServer replicas Serve may start.")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="Requests in progress per replica that the autoscaler aims for."
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="Seconds load must stay high before adding a replica.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Seconds load must stay low before removing one.")
    look_back_period_s: float = Field(30.0, gt=0, description="Seconds of load history each decision averages.")
    metric: Literal["ongoing_requests", "engine_utilization"] = Field(
        "ongoing_requests",
        description="Scale on requests in progress, or on how full each engine's batch and KV cache are "
        "(plus waiting sequences), so long generations count as busy.",
    )
    target_engine_utilization: float = Field(
        0.75, gt=0, description="With metric engine_utilization: the mean utilization aimed for (1 = full)."
    )

    @model_validator(mode="after")
    def _range(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is more than max_replicas ({self.max_replicas})")
        return self


class AppConfig(EngineConfig):
    """The engine's settings (EngineConfig) plus how the replicas are served."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    served_model_name: str | None = Field(
        None, description="Name clients pass as `model`; defaults to the model directory's name."
    )
    num_replicas: int | None = Field(1, ge=1, description="Fixed replica count; set to null when autoscaling is used.")
    autoscaling: AutoscalingConfig | None = Field(None, description="Scale replicas on load instead of a fixed count.")
    max_queued_requests: int = Field(
        -1,
        ge=-1,
        description="Requests a replica may hold waiting for room in its batch or KV cache before refusing more "
        "with 429 / RESOURCE_EXHAUSTED; -1 = no limit.",
    )
    routing: Literal["prefix_affinity", "power_of_two_choices"] = Field(
        "prefix_affinity",
        description="Send requests sharing a long prompt prefix to the replica that has it cached, unless "
        "it is much busier; or plain power of two choices.",
    )
    api_key: str | None = Field(
        None,
        description="When set, requests must send `Authorization: Bearer <key>`. It travels in the Serve config "
        "(and Serve logs it): prefer api_key_file, or SHARDSERVE_API_KEY for shardserve serve.",
    )
    api_key_file: str | None = Field(
        None,
        description="A file holding the API key, read by each replica when it starts (a mounted Kubernetes "
        "Secret): the key stays out of the Serve config and the logs.",
    )
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto",
        description="How the model writes tool calls: `<tool_call>` blocks (hermes: Qwen2, Hermes), JSON objects "
        "(llama3_json: Llama 3.1+) or `[TOOL_CALLS]` (mistral); auto = from the chat template, hermes if it shows none.",
    )
    replica_failover: bool = Field(
        True,
        description="A Relay deployment holds every stream and resumes it on another replica, token-exact, "
        "when its replica's process dies (max_migrations, recovery_timeout_s bound it). Off: tokens go from the "
        "replica through HAProxy alone, and a replica's death ends its streams.",
    )
    max_request_body_bytes: int = Field(
        4 << 20, ge=1024, description="Largest request body accepted; a larger one gets 413 before it is parsed."
    )
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="Seconds a stopping server lets requests in flight finish: shardserve serve after SIGTERM or "
        "SIGINT, and each replica Serve takes down (its graceful_shutdown_timeout_s).",
    )

    @model_validator(mode="after")
    def _one_key(self) -> "AppConfig":
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("set api_key or api_key_file, not both")
        return self

    @model_validator(mode="after")
    def _replicas(self) -> "AppConfig":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both (num_replicas: null to autoscale)")
        if self.num_replicas is None and self.autoscaling is None:
            raise ValueError("set num_replicas or an autoscaling block")
        return self

    def engine_config(self) -> EngineConfig:
        """The engine's part of this config (the serving fields left out)."""
        return EngineConfig.model_construct(**self.model_dump(include=set(EngineConfig.model_fields)))  # validated here


def read_api_key(path: str) -> str:
    """The key in an api_key_file (surrounding whitespace dropped, as a Secret file may end in a newline)."""
    try:
        key = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"api_key_file {path}: {e.strerror}") from None
    if not key:
        raise ConfigError(f"api_key_file {path} is empty")
    return key


class ConfigError(ValueError):
    """A config file that does not load, with the path of every bad field."""


def parse_app_config(data: dict, source: str = "config") -> AppConfig:
    try:
        return AppConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_problems(e)}") from None


LISTENER_FIELDS = ("host", "port", "grpc_port")  # not AppConfig fields: Serve's http_options / grpc_options


def _problems(e: ValidationError) -> str:
    problems = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        hint = ""
        if err["type"] == "extra_forbidden" and err["loc"][-1] in LISTENER_FIELDS:
            hint = " (listeners are set in the Serve config's http_options and grpc_options)"
        problems.append(f"{where}: {err['msg']}{hint}")
    return "; ".join(problems)


@dataclass(frozen=True)
class Listeners:
    """Where Serve's proxies listen. A Serve config file says it in its own http_options and
    grpc_options, which `serve run` reads too; without a file these defaults apply."""

    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = 9000  # None: no gRPC server


def load_serve_file(path: str | Path) -> tuple[AppConfig, Listeners]:
    """Read a Serve config YAML (AppConfig under applications[0].args, listeners in http_options and
    grpc_options) or a bare AppConfig mapping (default listeners)."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if "applications" not in data:
        return parse_app_config(data, str(path)), Listeners()
    apps = data["applications"]
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{path}: applications must be a non-empty list")
    config = parse_app_config(apps[0].get("args") or {}, f"{path}: applications[0].args")
    return config, serve_listeners(data, str(path))


def check_serve_schema(serve_config: dict, source: str = "config"):
    """The file as Ray Serve reads it (its ServeDeploySchema); ConfigError naming what Serve refuses."""
    from ray.serve.schema import ServeDeploySchema

    try:
        return ServeDeploySchema.model_validate(serve_config)
    except ValidationError as e:
        raise ConfigError(f"{source}: not a valid Ray Serve config: {_problems(e)}") from None


def serve_listeners(serve_config: dict, source: str = "config") -> Listeners:
    """The listeners a Serve config asks for, with Serve's own defaults for what it leaves out."""
    schema = check_serve_schema(serve_config, source)
    grpc = schema.grpc_options
    return Listeners(
        host=schema.http_options.host,
        port=schema.http_options.port,
        grpc_port=grpc.port if grpc.grpc_servicer_functions else None,  # Serve starts no gRPC server without them
    )


def load_app_config(path: str | Path) -> AppConfig:
    return load_serve_file(path)[0]


def config_reference() -> str:
    """The README's config table, built from the field descriptions so the two cannot drift."""
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for prefix, model in (("", AppConfig), ("autoscaling.", AutoscalingConfig)):  # engine fields first
        for name, f in model.model_fields.items():
            default = "null" if f.default is None else f"`{f.default}`"
            rows.append(f"| `{prefix}{name}` | {default} | {f.description} |")
    return "\n".join(rows)
