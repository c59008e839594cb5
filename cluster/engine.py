"""The engine: one replica's step loop over a gang, and the async ``generate()`` stream API.

A background task keeps up to ``pp`` micro-batches inside the pipeline: while
the last stage works on one batch, the first stage already runs the next. Each
step the scheduler picks the batch, the engine flattens it into one
``StepInput`` for all workers, and the sampled tokens that come back are
detokenized and pushed to each request's queue. With prefix caching (on by
default), prompts that share full KV blocks with earlier ones skip computing
them; ``stats()`` counts the tokens looked up, found and computed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from cluster.gang import Gang
from cluster.parallel import ParallelConfig
from cluster.scheduler import Batch, Scheduler, Sequence
from cluster.worker import DTYPES, StepInput, WorkerConfig
from model.config import ModelSpec
from model.kv_cache import BlockAllocator
from model.layers import kv_heads_per_partition
from model.sampling import SampleOutput, SamplingParams
from model.sources import resolve_model
from model.tokenizer import IncrementalDetokenizer, load_tokenizer

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine's gang failed; requests in flight end with this error."""


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # None = the bundled SmolLM2-135M-Instruct
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    layer_split: tuple[int, ...] | None = None
    dtype: str = "float32"
    device: str = "cpu"
    max_model_len: int | None = None  # None = the model's limit, capped by the KV cache
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512  # tokens per step; longer prompts are chunked
    block_size: int = 16
    num_kv_blocks: int | None = None  # None = derived from kv_cache_memory_gib
    kv_cache_memory_gib: float = 1.0  # KV cache per worker when num_kv_blocks is None
    cpus_per_worker: float | None = None  # None = this host's cores shared among the workers
    enable_prefix_caching: bool = True  # reuse the K/V of full blocks shared with earlier prompts

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size, self.layer_split)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None


@dataclass
class RequestOutput:
    """One delta of a request's stream."""

    request_id: str
    text: str  # new text since the previous delta
    token_ids: list[int]  # new tokens since the previous delta
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


def num_kv_blocks_for(config: EngineConfig, spec: ModelSpec) -> int:
    """Blocks that fit kv_cache_memory_gib on the worker holding the most layers."""
    parallel = config.parallel
    layers = max(end - start for start, end in parallel.layer_ranges(spec.num_layers))
    elem = torch.tensor([], dtype=DTYPES[config.dtype]).element_size()
    kv_heads = kv_heads_per_partition(spec.num_kv_heads, parallel.tp)
    per_block = 2 * layers * config.block_size * kv_heads * spec.head_dim * elem
    return int(config.kv_cache_memory_gib * (1 << 30) // per_block)


class LLMEngine:
    def __init__(self, config: EngineConfig, *, pg=None, bundle_offset: int = 0):
        self.config = config
        self.model_dir = resolve_model(config.model)
        self.spec = ModelSpec.from_pretrained(self.model_dir)
        parallel = config.parallel
        parallel.validate(self.spec)  # refuse a bad layout before any actor starts
        self.tokenizer = load_tokenizer(self.model_dir)

        num_blocks = config.num_kv_blocks or num_kv_blocks_for(config, self.spec)
        capacity = num_blocks * config.block_size
        limit = min(self.spec.max_position_embeddings, capacity)
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds what fits: the model allows "
                f"{self.spec.max_position_embeddings} positions and the KV cache holds {capacity} tokens"
            )
        self.max_model_len = config.max_model_len or limit

        cpus = config.cpus_per_worker or max(0.01, (os.cpu_count() or 1) / parallel.world_size)
        worker_config = WorkerConfig(
            model_dir=str(self.model_dir),
            spec=self.spec,
            parallel=parallel,
            dtype=config.dtype,
            device=config.device,
            num_threads=max(1, int(cpus)),
            shm_max_elems=max(
                config.max_num_batched_tokens * self.spec.hidden_size,
                config.max_num_seqs * self.spec.vocab_size,
            ),
        )
        self.gang = Gang(worker_config, cpus_per_worker=cpus, pg=pg, bundle_offset=bundle_offset)
        self.gang.init_cache(num_blocks, config.block_size)
        self.allocator = BlockAllocator(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            self.allocator,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            num_micro_batches=parallel.pp,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        self.eos_token_ids = set(self.spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self._requests: dict[str, _Request] = {}
        self._in_flight: deque[tuple[Batch, asyncio.Future]] = deque()
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.dead: BaseException | None = None

    # -- public API ---------------------------------------------------------------
    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas; cancelling the consumer aborts the request and frees its blocks."""
        if self.dead is not None:
            raise EngineDeadError(f"engine is dead: {self.dead}")
        self.check_request(prompt_ids, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = self.scheduler.add(request_id, prompt_ids, params, seed)
        req = _Request(seq, IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop))
        self._requests[request_id] = req
        self._ensure_loop()
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await req.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuse what can never run, before it is queued."""
        if not prompt_ids:
            raise ValueError("prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {self.spec.vocab_size})")
        total = len(prompt_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) is {total}, "
                f"over the context length {self.max_model_len}"
            )

    def abort(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is not None:
            req.seq.aborted = True
            self.scheduler.finish(req.seq)

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_free": self.allocator.num_free,
            "kv_blocks_total": self.allocator.num_blocks,
            "preemptions": self.scheduler.num_preemptions,
            # Cumulative token counts since the engine started.
            "prefix_cache_query_tokens": self.scheduler.prefix_cache_query_tokens,
            "prefix_cache_hit_tokens": self.scheduler.prefix_cache_hit_tokens,
            "prefill_tokens_computed": self.scheduler.num_prefill_tokens,
            "kv_blocks_cached": self.allocator.num_cached,  # free blocks still holding a reusable prefix
        }

    async def check_health(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"engine is dead: {self.dead}")
        await self.gang.check_health()

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
        self._fail_all(EngineDeadError("engine shut down"))
        self.gang.shutdown()

    # -- the step loop ------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                while len(self._in_flight) < self.config.parallel.pp:
                    batch = self.scheduler.schedule()
                    if batch is None:
                        break
                    fut = asyncio.ensure_future(self.gang.execute(self._build_step(batch)))
                    self._in_flight.append((batch, fut))
                if not self._in_flight:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                batch, fut = self._in_flight.popleft()
                self._apply(batch, await fut)  # micro-batches come back in the order they went in
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            log.exception("engine step failed; failing all requests")
            self.dead = e
            self._fail_all(EngineDeadError(f"engine failed: {e}"))

    def _build_step(self, batch: Batch) -> StepInput:
        bs = self.config.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampled: list[Sequence] = []
        for e in batch.entries:
            seq = e.seq
            tokens += seq.token_slice(e.start, e.start + e.num_new)
            for p in range(e.start, e.start + e.num_new):
                positions.append(p)
                slots.append(seq.block_ids[p // bs] * bs + p % bs)
            if e.samples:
                sample_rows.append(len(tokens) - 1)
                sampled.append(seq)
        width = max(len(e.seq.block_ids) for e in batch.entries)
        tables = [e.seq.block_ids + [0] * (width - len(e.seq.block_ids)) for e in batch.entries]
        return StepInput(
            token_ids=tokens,
            positions=positions,
            slot_mapping=slots,
            query_lens=[e.num_new for e in batch.entries],
            context_lens=[e.start + e.num_new for e in batch.entries],
            block_tables=tables,
            num_decodes=batch.num_decodes,
            sample_rows=sample_rows,
            sampling=[s.params for s in sampled],
            seeds=[s.seed for s in sampled],
            steps=[len(s.output_ids) for s in sampled],
        )

    def _apply(self, batch: Batch, out: SampleOutput) -> None:
        row = 0
        for e in batch.entries:
            seq = e.seq
            seq.in_flight = False
            samples = e.samples
            if samples:
                i, row = row, row + 1
            if seq.aborted:
                continue
            seq.num_computed = e.start + e.num_new
            if not samples:
                continue
            token = out.token_ids[i]
            seq.output_ids.append(token)
            req = self._requests[seq.request_id]
            text, hit_stop = req.detok.add(token)
            reason = self._finish_reason(seq, token, hit_stop)
            if reason is not None and not hit_stop:
                text += req.detok.flush()  # text held back in case it began a stop string
            logprobs = None
            if seq.params.logprobs is not None:
                logprobs = [TokenLogprob(token, out.logprobs[i], out.top_logprobs[i])]
            req.queue.put_nowait(
                RequestOutput(
                    request_id=seq.request_id,
                    text=text,
                    token_ids=[token],
                    logprobs=logprobs,
                    finished=reason is not None,
                    finish_reason=reason,
                    prompt_tokens=len(seq.prompt_ids),
                    completion_tokens=len(seq.output_ids),
                )
            )
            if reason is not None:
                self._requests.pop(seq.request_id, None)
                self.scheduler.finish(seq)

    def _finish_reason(self, seq: Sequence, token: int, hit_stop: bool) -> str | None:
        p = seq.params
        if hit_stop or token in p.stop_token_ids:
            return "stop"
        if token in self.eos_token_ids and not p.ignore_eos:
            return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _fail_all(self, error: BaseException) -> None:
        for request_id, req in list(self._requests.items()):
            req.queue.put_nowait(error)
            self.scheduler.finish(req.seq)
        self._requests.clear()
        for _, fut in self._in_flight:
            fut.cancel()
        self._in_flight.clear()
