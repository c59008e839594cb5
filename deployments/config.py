"""AppConfig: the one description of a shardserve deployment, validated when it is loaded.

The same YAML file is a Ray Serve config (``applications[0].args`` holds the
AppConfig), so ``serve run``, ``serve deploy``, ``shardserve`` and the KubeRay
``serveConfigV2`` all read one source of truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.engine import EngineConfig


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


class AppConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(
        None, description="HF directory, .gguf file, or null for the bundled SmolLM2-135M-Instruct."
    )
    served_model_name: str | None = Field(
        None, description="Name clients pass as `model`; defaults to the model directory's name."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weight and activation dtype.")
    device: Literal["cpu", "cuda"] = Field("cpu", description="Where workers run: one GPU each on cuda.")
    tensor_parallel_size: int = Field(1, ge=1, description="Workers that split each layer (must divide the heads).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Stages the layers are split into.")
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt + output in tokens; null = the model's limit capped by the KV cache."
    )
    max_num_seqs: int = Field(32, ge=1, description="Most sequences in one batch.")
    max_num_batched_tokens: int = Field(512, ge=1, description="Most tokens computed in one step; longer prompts are chunked.")
    num_kv_blocks: int | None = Field(None, ge=1, description="KV cache blocks per worker; null = from kv_cache_memory_gib.")
    kv_cache_memory_gib: float = Field(1.0, gt=0, description="KV cache memory per worker when num_kv_blocks is null.")
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV blocks of prompt prefixes already computed (same system prompt, same chat)."
    )
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs reserved per worker on cpu; null = 1 when serving, the host's cores shared offline."
    )
    num_replicas: int | None = Field(1, ge=1, description="Fixed replica count; set to null when autoscaling is used.")
    autoscaling: AutoscalingConfig | None = Field(None, description="Scale replicas on load instead of a fixed count.")
    host: str = Field("127.0.0.1", description="HTTP listen address.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible endpoint.")
    grpc_port: int | None = Field(
        9000, ge=1, le=65535, description="gRPC port (deployments/proto/shardserve.proto); null = no gRPC."
    )
    max_queued_requests: int = Field(
        -1,
        ge=-1,
        description="Requests a router may hold for busy replicas before refusing with 429 / RESOURCE_EXHAUSTED; -1 = no limit.",
    )
    routing: Literal["prefix_affinity", "power_of_two_choices"] = Field(
        "prefix_affinity",
        description="Send requests sharing a long prompt prefix to the replica that has it cached, unless "
        "it is much busier; or plain power of two choices.",
    )
    api_key: str | None = Field(None, description="When set, requests must send `Authorization: Bearer <key>`.")

    @model_validator(mode="after")
    def _replicas(self) -> "AppConfig":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both (num_replicas: null to autoscale)")
        if self.num_replicas is None and self.autoscaling is None:
            raise ValueError("set num_replicas or an autoscaling block")
        return self

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            dtype=self.dtype,
            device=self.device,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            num_kv_blocks=self.num_kv_blocks,
            kv_cache_memory_gib=self.kv_cache_memory_gib,
            cpus_per_worker=self.cpus_per_worker,
            enable_prefix_caching=self.enable_prefix_caching,
        )


class ConfigError(ValueError):
    """A config file that does not load, with the path of every bad field."""


def parse_app_config(data: dict, source: str = "config") -> AppConfig:
    try:
        return AppConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def load_app_config(path: str | Path) -> AppConfig:
    """Read a Serve config YAML (AppConfig under applications[0].args) or a bare AppConfig mapping."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if "applications" in data:
        apps = data["applications"]
        if not isinstance(apps, list) or not apps:
            raise ConfigError(f"{path}: applications must be a non-empty list")
        return parse_app_config(apps[0].get("args") or {}, f"{path}: applications[0].args")
    return parse_app_config(data, str(path))


def config_reference() -> str:
    """The README's config table, built from the field descriptions so the two cannot drift."""
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for prefix, model in (("", AppConfig), ("autoscaling.", AutoscalingConfig)):
        for name, f in model.model_fields.items():
            default = "null" if f.default is None else f"`{f.default}`"
            rows.append(f"| `{prefix}{name}` | {default} | {f.description} |")
    return "\n".join(rows)
