"""The engine: one replica's step loop over a gang, and the async ``generate()`` stream API.

``generate(GenerateRequest)`` takes text, chat messages or token ids; the input processor
tokenizes and checks it once, the scheduler owns the sequence from then on, and the output
stream turns its sampled tokens into text deltas (cluster/processing.py). A background task
keeps up to ``pp`` micro-batches inside the pipeline: while the last stage works on one
batch, the first stage already runs the next. Each step the scheduler picks the batch, the
engine flattens it into one ``StepInput`` for all workers, and hands what comes back to
``Scheduler.update``. With prefix caching (on by default), prompts that share full KV blocks
with earlier ones skip computing them; ``stats()`` counts the tokens looked up, found and
computed. When a worker dies or hangs (cluster/watchdog.py), a new gang takes over and every
live request is recomputed from its prompt and the tokens it already streamed (``_recover``).
A request that another replica began before it died comes with those tokens (``Resume``): they
are replayed into the request's state, recomputed with the prompt, and the stream goes on
(``_replay``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import sys
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from cluster.config import EngineConfig
from cluster.guided import GuidedDecoding
from cluster.local_gang import LocalGang
from cluster.processing import InputProcessor, OutputStream
from cluster.protocol import EngineDeadError, EngineStats, GangError, GenerateRequest, RequestOutput, Resume
from cluster.scheduler import Batch, Scheduler, Sequence
from cluster.watchdog import StepDeadline
from cluster.worker import StepInput
from model.attention import kv_cache_shape
from model.config import ModelSpec
from model.kv_cache import BlockAllocator
from model.sampling import SampleOutput
from model.sources import resolve_model
from model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    seq: Sequence
    stream: OutputStream
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    migrations: int = 0  # gangs this request has lived through the failure of


def num_kv_blocks_for(config: EngineConfig, spec: ModelSpec) -> int:
    """Blocks that fit kv_cache_memory_gib on the worker whose cache is largest per block."""
    per_block = max(
        math.prod(kv_cache_shape(spec, plan.shard, 1, config.block_size))
        for plan in config.parallel.plans(spec.num_layers)
    ) * getattr(torch, config.dtype).itemsize
    return int(config.kv_cache_memory_gib * (1 << 30) // per_block)


class LLMEngine:
    def __init__(self, config: EngineConfig, *, pg=None, bundle_offset: int = 0):
        config = self.config = config.with_cpus_resolved()  # what the gang reserves and its workers use
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
        self.processor = InputProcessor(self.tokenizer, self.spec.vocab_size, self.max_model_len)
        # Tokenizing runs here, off the event loop, so a long prompt does not stall other streams;
        # one thread, so the tokenizer is never entered twice at once.
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")

        if config.worker_in_process:  # the model in this process, no Ray
            self.gang = LocalGang(config, str(self.model_dir))
        else:
            from cluster.gang import Gang  # Ray is imported only for actors

            self.gang = Gang(config, str(self.model_dir), pg=pg, bundle_offset=bundle_offset)
        self.gang.init_cache(num_blocks)
        self.num_blocks = num_blocks
        print(f"shardserve: KV cache: {num_blocks} blocks of {config.block_size} tokens ({capacity} tokens) per worker; "
              f"max_model_len {self.max_model_len}, up to {config.max_num_seqs} sequences a step", file=sys.stderr,
              flush=True)  # fmt: skip
        self.allocator = BlockAllocator(num_blocks, config.block_size)
        eos_token_ids = set(self.spec.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos_token_ids.add(self.tokenizer.eos_token_id)
        self.guided = GuidedDecoding(self.tokenizer)
        self.scheduler = Scheduler(
            self.allocator,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            num_micro_batches=parallel.pp,
            enable_prefix_caching=config.enable_prefix_caching,
            max_model_len=self.max_model_len,
            eos_token_ids=frozenset(eos_token_ids),
        )
        self._requests: dict[str, _Request] = {}
        self._in_flight: deque[tuple[Batch, asyncio.Future, float]] = deque()  # batch, result, submit time
        self.step_deadline = StepDeadline(floor_s=config.step_timeout_s)
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.dead: BaseException | None = None
        self.recovering = False  # a new gang is being started; requests wait for it
        self._idle_failure: GangError | None = None  # found by a health check between steps
        self.num_recoveries = 0

    # -- public API ---------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's deltas; cancelling the consumer aborts the request and frees its blocks.

        Raises InvalidRequestError before anything is queued when the request can never run.
        """
        if self.dead is not None:
            raise EngineDeadError(f"engine is dead: {self.dead}")
        loop = asyncio.get_running_loop()
        prompt_ids, params = await loop.run_in_executor(self._tokenize_pool, self.processor.process, request)
        matcher = None
        if params.json_schema is not None or params.lark_grammar is not None:  # a new grammar compiles off the loop too
            matcher = await loop.run_in_executor(self._tokenize_pool, self.guided.matcher, params)
        if self.dead is not None:
            raise EngineDeadError(f"engine is dead: {self.dead}")
        request_id = request.request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        seq = self.scheduler.add(request_id, prompt_ids, params, seed)
        seq.matcher = matcher
        req = _Request(seq, OutputStream(self.tokenizer, request_id, prompt_ids, params))
        self._requests[request_id] = req
        finished = False
        if request.resume is not None:
            replay = self._replay(req, request.resume)
            if replay.finished:  # it had ended: nothing to run, only its state to report
                self.abort(request_id)
                yield replay
                return
            req.queue.put_nowait(replay)
        self._ensure_loop()
        self._wakeup.set()
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

    def _replay(self, req: _Request, resume: Resume) -> RequestOutput:
        """The tokens another replica already streamed, taken as if sampled here (the sequence, its
        grammar, its detokenizer and counts move on through them), as one delta: the first of the
        stream, which the caller does not send again. The sequence is still waiting, so its prefill
        computes them with the prompt."""
        seq, text = req.seq, []
        for token in resume.token_ids:
            seq.output_ids.append(token)
            if seq.matcher is not None:
                seq.matcher.consume_token(token)
            text.append(req.stream.add(token, None, None, None).text)
        if resume.finish_reason is not None:
            text.append(req.stream.detok.flush())
        return RequestOutput(seq.request_id, "".join(text), list(resume.token_ids), None,
                             finished=resume.finish_reason is not None, finish_reason=resume.finish_reason,
                             prompt_tokens=req.stream.prompt_tokens, completion_tokens=req.stream.completion_tokens)  # fmt: skip

    def abort(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req.seq, "abort")

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_free=self.allocator.num_free,
            kv_blocks_total=self.allocator.num_blocks,
            kv_blocks_cached=self.allocator.num_cached,
            preemptions=self.scheduler.num_preemptions,
            prefix_cache_query_tokens=self.scheduler.prefix_cache_query_tokens,
            prefix_cache_hit_tokens=self.scheduler.prefix_cache_hit_tokens,
            prefill_tokens_computed=self.scheduler.num_prefill_tokens,
        )

    async def check_health(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"engine is dead: {self.dead}")
        if self.recovering or self._idle_failure is not None:  # bounded by recovery_timeout_s
            return
        if self._in_flight:  # a worker answers a ping only between steps; the step deadline watches these
            return
        try:
            await self.gang.check_health(timeout_s=self.config.step_timeout_s)
        except GangError as e:
            if self.config.max_migrations == 0:
                raise
            # Broken while no step ran: the step loop replaces the gang, as it would mid-step.
            self._idle_failure = e
            self._ensure_loop()
            self._wakeup.set()

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except (asyncio.CancelledError, Exception):
                pass
        self._fail_all(EngineDeadError("engine shut down"))
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self.gang.shutdown()

    # -- the step loop ------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self._steps()
            except asyncio.CancelledError:
                raise
            except GangError as e:  # a worker died, hung or failed: resume the requests on a new gang
                log.error("gang failed: %s", e)
                if await self._recover(e):
                    continue
                self._die(e)
                return
            except BaseException as e:
                self._die(e)
                return

    async def _steps(self) -> None:
        while True:
            if self._idle_failure is not None:
                error, self._idle_failure = self._idle_failure, None
                raise error
            while len(self._in_flight) < self.config.parallel.pp:
                batch = self.scheduler.schedule()
                if batch is None:
                    break
                fut = asyncio.ensure_future(self.gang.execute(self._build_step(batch)))
                self._in_flight.append((batch, fut, time.monotonic()))
            if not self._in_flight:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, fut, started = self._in_flight[0]  # micro-batches come back in the order they went in
            tokens = batch.num_tokens
            limit = self.step_deadline.timeout(tokens)
            try:
                out = await asyncio.wait_for(asyncio.shield(fut), started + limit - time.monotonic())
            except asyncio.TimeoutError:
                self.gang.broken = self.gang.broken or TimeoutError(f"no step result in {limit:.1f} s")
                raise GangError(f"a step of {tokens} tokens made no progress in {limit:.1f} s: "
                                "a worker is hung or stopped") from None  # fmt: skip
            self._in_flight.popleft()
            self.step_deadline.record(time.monotonic() - started, tokens)
            self._apply(batch, out)

    async def _recover(self, error: GangError) -> bool:
        """Start a new gang and put every live request back in the queue, to be recomputed from its
        prompt and the tokens it already streamed: its stream goes on where it stopped, token for
        token (sampling draws per (seed, step)). A request that has already lived through
        max_migrations failures fails now. False when no new gang can be had in time."""
        for _, fut, _ in self._in_flight:
            fut.cancel()
        self._in_flight.clear()
        limit = self.config.max_migrations
        for request_id, req in list(self._requests.items()):
            req.migrations += 1
            if req.migrations > limit:
                self._fail(request_id, EngineDeadError(f"past max_migrations ({limit}): {error}"))
        if limit == 0:
            return False
        self.recovering = True
        try:
            log.warning("starting a new gang for %d requests", len(self._requests))
            t0 = time.monotonic()
            timeout = self.config.recovery_timeout_s
            await asyncio.wait_for(asyncio.to_thread(self.gang.restart, self.num_blocks, timeout), timeout)
        except (GangError, asyncio.TimeoutError) as e:
            log.error("no new gang: %s", e)
            return False
        finally:
            self.recovering = False
        self.allocator = BlockAllocator(self.num_blocks, self.config.block_size)
        self.scheduler.requeue_all(self.allocator)
        self.step_deadline = StepDeadline(floor_s=self.config.step_timeout_s)  # new workers build kernels anew
        self.num_recoveries += 1
        log.warning("new gang ready in %.1f s; %d requests resume", time.monotonic() - t0, len(self._requests))
        return True

    def _die(self, error: BaseException) -> None:
        log.error("engine failed; failing all requests", exc_info=error)
        self.dead = error
        self._fail_all(EngineDeadError(f"engine failed: {error}"))

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
            token_masks={i: self.guided.mask(s.matcher) for i, s in enumerate(sampled) if s.matcher is not None},
            # The output ids are copied: the list grows once the step is back, and a StepInput should not
            # change after it is built (the prompt ids never do).
            penalty_ids={i: (s.prompt_ids if s.params.repetition_penalty != 1 else [], list(s.output_ids))
                         for i, s in enumerate(sampled) if s.params.penalizes},  # fmt: skip
            # min_tokens holds back exactly the ids that would stop the sequence (Scheduler._stop_reason):
            # its stop_token_ids, and EOS unless ignore_eos or a grammar decides the end.
            banned_ids={i: [*s.params.stop_token_ids,
                            *(self.scheduler.eos_token_ids if not s.params.ignore_eos and s.matcher is None else ())]
                        for i, s in enumerate(sampled) if len(s.output_ids) < s.params.min_tokens},  # fmt: skip
        )

    def _apply(self, batch: Batch, out: SampleOutput) -> None:
        for seq, row in self.scheduler.update(batch, out.token_ids):
            req = self._requests[seq.request_id]
            if seq.matcher is not None and seq.finish_reason is None:
                self._advance_grammar(seq, out.token_ids[row])
            delta = req.stream.add(out.token_ids[row], seq.finish_reason, out.logprobs[row], out.top_logprobs[row],
                                   seq.cached_tokens)  # fmt: skip
            if req.stream.hit_stop_string:
                self.scheduler.finish(seq, "stop")
            req.queue.put_nowait(delta)
            if delta.finished:
                self._requests.pop(seq.request_id, None)

    def _advance_grammar(self, seq: Sequence, token: int) -> None:
        """The sampled token moves the grammar on; a complete value (the JSON closed) ends the request."""
        if not seq.matcher.consume_token(token):  # the mask allowed only grammar tokens: a bug if reached
            log.error("request %s: token %d outside its grammar: %s", seq.request_id, token, seq.matcher.get_error())
            self.scheduler.finish(seq, "stop")
        elif seq.matcher.is_stopped():
            self.scheduler.finish(seq, "stop")

    def _fail(self, request_id: str, error: BaseException) -> None:
        req = self._requests.pop(request_id)
        req.queue.put_nowait(error)
        self.scheduler.finish(req.seq, "abort")

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._requests):
            self._fail(request_id, error)
        for _, fut, _ in self._in_flight:
            fut.cancel()
        self._in_flight.clear()
