"""EngineConfig: every setting of one engine (model, layout, batching, KV cache), declared and validated once.

The same frozen object travels from the YAML file (``deployments.config.AppConfig`` extends it with
the serving settings) or the command line to the engine and on to every worker of its gang.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.parallel import ParallelConfig

DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes: getattr(torch, name)
DEVICES = ("cpu", "cuda")
PROGRESS_BARS_ENV = "SHARDSERVE_PROGRESS_BARS"  # "1": `shardserve serve` writes to a terminal; workers draw load bars


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(
        None,
        description="HF directory, .gguf file, Hugging Face model ID (org/name[@revision], fetched once per node "
        "into the HF cache), or null for the bundled SmolLM2-135M-Instruct.",
    )
    dtype: Literal[DTYPES] = Field("float32", description="Weight and activation dtype.")
    device: Literal[DEVICES] = Field("cpu", description="Where workers run: one GPU each on cuda.")
    tensor_parallel_size: int = Field(1, ge=1, description="Workers that split each layer (must divide the heads).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Stages the layers are split into.")
    layer_split: tuple[int, ...] | None = Field(
        None, description="Layers per pipeline stage (YAML [16, 14], flag 16,14); null = as even as possible."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt + output in tokens; null = the model's limit capped by the KV cache."
    )
    max_num_seqs: int = Field(32, ge=1, description="Most sequences in one batch.")
    max_num_batched_tokens: int = Field(
        512, ge=1, description="Most tokens computed in one step; longer prompts are chunked."
    )
    block_size: int = Field(16, ge=1, description="Tokens per KV cache block.")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="KV cache blocks per worker; null = from kv_cache_memory_gib."
    )
    kv_cache_memory_gib: float = Field(1.0, gt=0, description="KV cache memory per worker when num_kv_blocks is null.")
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV blocks of prompt prefixes already computed (same system prompt, same chat)."
    )
    cpu_decode_kernel: bool = Field(
        True,
        description="On CPU, keep each linear weight as loaded beside its oneDNN-packed copy, so decode steps of "
        "one or two tokens run in the compiled GEMV (1.2-1.9x faster); off saves that memory.",
    )
    step_timeout_s: float = Field(
        5.0,
        gt=0,
        description="A step that takes longer than this and 10x the slowest recent step (scaled to its tokens) "
        "means a worker is hung: the replica fails its requests and its health check, and is replaced.",
    )
    worker_process: Literal["separate", "in_process"] = Field(
        "separate",
        description="separate: each worker is a Ray actor of its own, so a crash or hang of it is survived by "
        "resuming its requests on a new one; in_process (tp = pp = 1 only): the worker runs in the engine's "
        "process, with no Ray at all (a machine without Ray, a profile of one process).",
    )
    max_migrations: int = Field(
        2,
        ge=0,
        description="Times a request may be resumed on a new gang after a worker of its gang dies or hangs, or, "
        "with replica_failover, on another replica after its replica dies (recomputed from its prompt and the "
        "tokens already sent); past that, or at 0, it fails with an error.",
    )
    recovery_timeout_s: float = Field(
        300.0, gt=0, description="Seconds a new gang may take to start and load; past that the replica fails."
    )
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs reserved per worker on cpu (it runs that many threads, a fraction rounded up); null = "
        "this machine's cores shared by the workers when shardserve starts Ray itself, 1 on a cluster it joins.",
    )

    @model_validator(mode="after")
    def _layout(self) -> "EngineConfig":
        _ = self.parallel  # built for its checks: a layer_split that does not fit pipeline_parallel_size
        if self.worker_process == "in_process" and self.parallel.world_size > 1:
            raise ValueError("worker_process in_process runs one worker: it needs tp = pp = 1")
        return self

    @property
    def worker_in_process(self) -> bool:
        return self.worker_process == "in_process"

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size, self.layer_split)

    def with_cpus_resolved(self) -> "EngineConfig":
        """This config with cpus_per_worker set: as given, else this host's cores shared among the gang."""
        if self.cpus_per_worker is not None:
            return self
        cpus = max(0.01, (os.cpu_count() or 1) / self.parallel.world_size)
        return self.model_copy(update={"cpus_per_worker": cpus})
