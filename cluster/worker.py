"""One worker of a gang: holds the (stage, tp_rank) shard of the model and its KV cache.

The engine sends every worker the same ``StepInput`` once per step. The first
stage embeds the token ids, later stages receive hidden states straight from
the previous stage's worker with the same tp_rank, and the last stage's
tp_rank 0 samples and returns only the sampled tokens.

This class is plain Python so that it runs in-process too; ``cluster/gang.py``
wraps it as a Ray actor.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from cluster.comm import GlooGroup, ShmGroup
from cluster.config import PROGRESS_BARS_ENV, EngineConfig
from model import cpu_kernels
from model.attention import AttentionMetadata, allocate_kv_cache, kv_cache_shape
from model.config import ModelSpec
from model.layers import SingleGroup
from model.loader import LoadReport, load_model
from model.sampling import SampleOutput, SamplingParams, apply_logits_processing, apply_token_masks, sample


@dataclass
class StepInput:
    """Everything a worker needs for one step; built once by the engine, sent to all workers.

    Plain lists, not tensors: a step crosses a process boundary every time, and pickling and
    unpickling a handful of small tensors costs ~0.55 ms per step, the same lists ~0.02 ms.
    """

    token_ids: list[int]  # (T,) sequences flattened, decodes first
    positions: list[int]  # (T,)
    slot_mapping: list[int]  # (T,)
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]  # (B, max_blocks), padded with 0
    num_decodes: int
    sample_rows: list[int]  # (N,) rows of T whose logits are sampled
    sampling: list[SamplingParams]  # per sampled row
    seeds: list[int]
    steps: list[int]  # tokens generated so far by each sampled row's request
    token_masks: dict[int, bytes] = field(default_factory=dict)  # sampled row -> allowed tokens (structured output)
    # Only rows that ask: sampled row -> (prompt ids, [] without repetition_penalty; output ids) for
    # penalties, and sampled row -> ids it may not sample yet (min_tokens: EOS and stop_token_ids).
    penalty_ids: dict[int, tuple[list[int], list[int]]] = field(default_factory=dict)
    banned_ids: dict[int, list[int]] = field(default_factory=dict)


DIST_TIMEOUT_S = 60.0  # rendezvous and collectives; a peer silent this long has failed


class Worker:
    def __init__(self, rank: int, config: EngineConfig, model_dir: str):
        self.config = config
        if not Path(model_dir).is_dir():  # the engine's node has it; this one resolves the source itself
            from model.sources import resolve_model

            model_dir = str(resolve_model(config.model))
        self.model_dir = model_dir
        self.spec = ModelSpec.from_pretrained(model_dir)
        self.parallel = config.parallel
        self.plan = self.parallel.plan(rank, self.spec.num_layers)
        self.shard = self.plan.shard
        self.dtype = getattr(torch, config.dtype)
        self.device = torch.device(config.device)
        if self.device.type == "cpu":
            # One thread per reserved CPU, a fraction counting whole: a worker that reserves 1.8 CPUs
            # (the rest of 2 going to the router and the replica) runs 2 threads.
            torch.set_num_threads(max(1, math.ceil(config.cpus_per_worker - 0.05)))
        elif self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # The largest tensor a TP collective carries: a step's hidden states, or its gathered logits.
        self.shm_max_elems = max(
            config.max_num_batched_tokens * self.spec.hidden_size, config.max_num_seqs * self.spec.vocab_size
        )
        self.tp_group = SingleGroup()
        self.model = None
        self.kv_caches: list[torch.Tensor] = []
        self._block_size = 0
        self._pending_send = None
        self._store = None
        self._own_segment: str | None = None

    # -- set-up -----------------------------------------------------------------
    def node_address(self) -> tuple[str, str]:
        """(node id, ip) of the host this worker runs on, so the gang can tell which ranks share a host."""
        import ray

        ctx = ray.get_runtime_context()
        return ctx.get_node_id(), ray.util.get_node_ip_address()

    def start_store(self) -> tuple[str, int]:
        """Rank 0 hosts the rendezvous store; the OS picks the port, so nothing races for one."""
        import ray

        ip = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(
            ip,
            0,
            self.parallel.world_size,
            True,
            timedelta(seconds=DIST_TIMEOUT_S),
            wait_for_workers=False,  # the others join in init_distributed
        )
        return ip, self._store.port

    def create_shm_segment(self) -> str:
        """A TP group leader makes the shared-memory segment its group talks through."""
        self._own_segment = ShmGroup.create_segment(self.parallel.tp, self.shm_max_elems)
        return self._own_segment

    def init_distributed(self, store_ip: str, store_port: int, shm_name: str | None) -> None:
        world = self.parallel.world_size
        timeout = timedelta(seconds=DIST_TIMEOUT_S)
        if world > 1:
            if self._store is None:
                self._store = dist.TCPStore(store_ip, store_port, world, False, timeout)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=self._store, rank=self.plan.rank, world_size=world, timeout=timeout)
        tp, tp_rank = self.shard.tp_size, self.shard.tp_rank
        if tp > 1:
            # Every rank must create every group, in the same order.
            groups = [dist.new_group(list(self.parallel.stage_ranks(s))) for s in range(self.parallel.pp)]
            if shm_name is not None:
                self.tp_group = ShmGroup(shm_name, tp_rank, tp, self.shm_max_elems, timeout_s=DIST_TIMEOUT_S)
            else:
                self.tp_group = GlooGroup(groups[self.shard.stage], tp_rank, tp)

    def release_shm_segment(self) -> None:
        """Unlink the segment once every rank has it mapped: the mappings live on, and no crash can leak the file."""
        if self._own_segment is not None:
            ShmGroup.unlink_segment(self._own_segment)
            self._own_segment = None

    def load(self) -> LoadReport:
        start = time.monotonic()
        if self.device.type == "cpu":
            cpu_kernels.load()  # compiled attention, element-wise ops, GEMV; plain torch where they cannot be built
        kernels_s = time.monotonic() - start
        bar = _WeightsBar(f"rank {self.plan.rank} weights")
        self.model, report = load_model(self.model_dir, self.spec, self.shard, self.tp_group, self.dtype, self.device,
                                        decode_kernel=self.config.cpu_decode_kernel, progress=bar)  # fmt: skip
        bar.close()
        s = self.shard
        kernels = f"CPU kernels {cpu_kernels.how_loaded or 'off'} ({kernels_s:.1f} s), " if self.device.type == "cpu" else ""
        print(f"shardserve: rank {self.plan.rank} (stage {s.stage + 1}/{s.num_stages}, tp {s.tp_rank + 1}/{s.tp_size}, "
              f"layers {s.layer_range[0]}-{s.layer_range[1] - 1}): {kernels}weights {report.bytes_read / 2**30:.2f} GiB read "
              f"in {time.monotonic() - start - kernels_s:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
        return report

    def init_cache(self, num_blocks: int) -> None:
        block_size = self.config.block_size
        shape = kv_cache_shape(self.spec, self.shard, num_blocks, block_size)
        self.kv_caches = allocate_kv_cache(shape, self.dtype, self.device)
        self._block_size = block_size

    # -- the step ---------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: StepInput) -> SampleOutput | None:
        dev = self.device
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=dev)  # noqa: E731
        meta = AttentionMetadata(
            slot_mapping=as_tensor(step.slot_mapping),
            query_lens=step.query_lens,
            context_lens=step.context_lens,
            block_tables=as_tensor(step.block_tables),
            num_decodes=step.num_decodes,
            block_size=self._block_size,
        )
        positions = as_tensor(step.positions)
        num_tokens = len(step.token_ids)
        if self.shard.is_first:
            x = as_tensor(step.token_ids)
        else:
            x = torch.empty(num_tokens, self.spec.hidden_size, dtype=self.dtype, device=dev)
            dist.recv(x, src=self.plan.prev_rank)
        hidden = self.model(x, positions, meta, self.kv_caches)
        if not self.shard.is_last:
            if self._pending_send is not None:
                self._pending_send.wait()  # the previous step's tensor may be freed only once sent
            self._pending_send = dist.isend(hidden.contiguous(), dst=self.plan.next_rank)
            return None
        logits = self.model.compute_logits(hidden[as_tensor(step.sample_rows)])
        if self.plan.rank != self.parallel.sampler_rank:
            return None
        logits = logits.float()
        if step.token_masks:
            apply_token_masks(logits, step.token_masks)
        # After the grammar's mask, as vLLM does; a masked -inf stays -inf through bias and penalties.
        # Logprobs come from these processed logits (before temperature), as they did before penalties.
        apply_logits_processing(logits, step.sampling, step.penalty_ids, step.banned_ids)
        return sample(logits, step.sampling, step.seeds, step.steps)

    # -- health and teardown ------------------------------------------------------
    def ping(self) -> int:
        return self.plan.rank

    def shutdown(self) -> None:
        if isinstance(self.tp_group, ShmGroup):
            self.tp_group.close()
        self.release_shm_segment()
        if dist.is_initialized():
            dist.destroy_process_group()


class _WeightsBar:
    """progress(done, total) for load_model: a bar in the driver's terminal when this runs as a Ray
    actor (Ray's tqdm relays it there); nothing where the output is a log file, which bars garble."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if os.environ.get(PROGRESS_BARS_ENV) != "1":
                return
            import ray

            if not ray.is_initialized():
                return
            from ray.experimental import tqdm_ray

            self.bar = tqdm_ray.tqdm(total=total, desc=self.desc, unit="tensors")
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
