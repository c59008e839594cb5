"""Continuous batching: which sequences run in the next step, and with how many tokens.

Every step the scheduler builds one micro-batch from sequences that are not
already inside the pipeline: running decodes first (one token each), then
unfinished prefills, then new arrivals, chunked so that a step never computes
more than ``max_num_batched_tokens``. When the KV cache is full, the most
recently arrived running sequence is preempted: its blocks are freed and it
goes back to the head of the queue to be recomputed later (prompt + what it
has generated so far), so its output is unchanged.

With prefix caching, a sequence admitted with nothing computed first takes the
longest run of cached full blocks matching its tokens (shared, reference
counted) and computes only from there; at least its last token is always
computed so that a token is sampled. A sequence's full blocks are registered in
the cache once the step that computed them has returned (at the next schedule,
or when the sequence is released), so a block is shared only after its K/V are
written. Writes only go to positions >= num_computed, never to a shared block.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field

from model.kv_cache import BlockAllocator, block_hash, blocks_for
from model.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    arrival: int
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort", once FINISHED
    in_flight: bool = False  # part of a micro-batch still inside the pipeline
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of its first full blocks
    num_registered: int = 0  # leading blocks already in the prefix cache (matched or registered)
    admitted_len: int = 0  # num_tokens when last admitted: positions below it are prefill/recompute
    matcher: object | None = None  # structured output: the grammar's state over output_ids (cluster/guided.py)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted (usage reports it)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        n_prompt = len(self.prompt_ids)
        if end <= n_prompt:
            return self.prompt_ids[start:end]
        if start >= n_prompt:
            return self.output_ids[start - n_prompt : end - n_prompt]
        return self.prompt_ids[start:] + self.output_ids[: end - n_prompt]


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step
    num_new: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence, so a new token is drawn."""
        return self.start + self.num_new == self.seq.num_tokens


@dataclass
class Batch:
    entries: list[ScheduledSeq]  # decodes (num_new == 1) first, then prefill chunks
    num_decodes: int

    @property
    def num_tokens(self) -> int:
        return sum(e.num_new for e in self.entries)


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        num_micro_batches: int = 1,
        enable_prefix_caching: bool = True,
        max_model_len: int | None = None,  # a sequence this long stops ("length"); None = no limit
        eos_token_ids: frozenset[int] = frozenset(),
    ):
        self.allocator = allocator
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.block_size = allocator.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_micro_batches = num_micro_batches
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.enable_prefix_caching = enable_prefix_caching
        self.num_preemptions = 0
        self.prefix_cache_query_tokens = 0  # tokens of admitted sequences looked up in the cache
        self.prefix_cache_hit_tokens = 0  # of those, tokens found (not computed)
        self.num_prefill_tokens = 0  # tokens scheduled below a sequence's admitted_len
        self._arrivals = itertools.count()

    # -- request lifecycle -------------------------------------------------
    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, seed: int) -> Sequence:
        seq = Sequence(request_id, list(prompt_ids), params, seed, next(self._arrivals))
        self.waiting.append(seq)
        return seq

    def finish(self, seq: Sequence, reason: str = "abort") -> None:
        """Retire a sequence and free its blocks at once (finished, aborted or failed). A step of it
        still inside the pipeline only writes K/V to positions it owned; its result is dropped."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def update(self, batch: Batch, token_ids: list[int]) -> list[tuple[Sequence, int]]:
        """Apply a step that came back, with one sampled token per sampling entry, in order.

        Each live entry's computed count advances; a sampled sequence gets its token and is
        finished when it hits a stop token, EOS, max_tokens or the context length
        (``finish_reason`` says which). Returns (sequence, its row in token_ids) for every live
        sampled sequence, finished ones included, so their last token still reaches the caller.
        """
        num_sampled = sum(e.samples for e in batch.entries)
        if len(token_ids) != num_sampled:
            raise ValueError(f"a step that samples {num_sampled} sequences came back with {len(token_ids)} tokens")
        sampled = []
        rows = iter(range(num_sampled))
        for e in batch.entries:
            seq = e.seq
            seq.in_flight = False
            row = next(rows) if e.samples else None
            if seq.status is SeqStatus.FINISHED:  # aborted while its step was in the pipeline
                continue
            seq.num_computed = e.start + e.num_new
            if row is None:
                continue
            token = token_ids[row]
            seq.output_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
            sampled.append((seq, row))
        return sampled

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        # A grammar (structured output) decides itself where the text ends, EOS included.
        if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos and seq.matcher is None):
            return "stop"
        if len(seq.output_ids) >= p.max_tokens:
            return "length"
        if self.max_model_len is not None and seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def requeue_all(self, allocator: BlockAllocator) -> None:
        """The KV cache is gone (the gang was replaced): from now on blocks come from `allocator`, and
        every running sequence waits again, in arrival order, to be recomputed (prompt + what it has
        generated), exactly as after a preemption, so its output goes on unchanged."""
        for seq in self.running:
            seq.block_ids, seq.num_computed, seq.num_registered = [], 0, 0
            seq.in_flight = False
            seq.status = SeqStatus.WAITING
        self.waiting = deque(sorted([*self.running, *self.waiting], key=lambda s: s.arrival))
        self.running = []
        self.allocator = allocator

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- scheduling ------------------------------------------------------------
    def schedule(self) -> Batch | None:
        """The next micro-batch, or None when nothing outside the pipeline can run."""
        budget = self.max_num_batched_tokens
        # With several micro-batches in the pipeline, share the sequences among them
        # so that every stage has work.
        max_seqs = self.max_num_seqs
        if self.num_micro_batches > 1:
            max_seqs = max(1, -(-self.num_unfinished // self.num_micro_batches))
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []
        if self.enable_prefix_caching:
            for seq in self.running:  # steps that returned since the last call may have filled blocks
                self._register_computed(seq)

        scheduled: set[int] = set()
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq.in_flight or seq.status is not SeqStatus.RUNNING:
                continue
            if len(decodes) + len(prefills) >= max_seqs or budget == 0:
                break
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._reserve(seq, n, scheduled):
                break  # seq itself was preempted; no room for anything later either
            entry = ScheduledSeq(seq, seq.num_computed, n)
            (decodes if n == 1 and entry.samples else prefills).append(entry)
            scheduled.add(id(seq))
            budget -= n

        while self.waiting and budget > 0 and len(decodes) + len(prefills) < max_seqs:
            # A waiting sequence (new or preempted) holds no blocks and has nothing computed.
            seq = self.waiting[0]
            shared = self._cached_prefix(seq)
            start = len(shared) * self.block_size
            n = min(seq.num_tokens - start, budget)
            need = blocks_for(start + n, self.block_size) - len(shared)
            if not self.allocator.can_allocate(need + self.allocator.num_revived(shared)):
                break  # admission never preempts a running sequence
            self.allocator.share(shared)
            seq.block_ids = shared + self.allocator.allocate(need)
            seq.num_computed = start
            seq.num_registered = len(shared)
            if seq.admitted_len == 0:  # first admission: a preempted sequence's recompute is not what its prompt cost
                seq.cached_tokens = min(start, len(seq.prompt_ids))
            seq.admitted_len = seq.num_tokens
            if self.enable_prefix_caching:
                self.prefix_cache_query_tokens += seq.num_tokens
                self.prefix_cache_hit_tokens += start
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            entry = ScheduledSeq(seq, seq.num_computed, n)
            (decodes if n == 1 and entry.samples else prefills).append(entry)
            budget -= n

        entries = decodes + prefills
        if not entries:
            return None
        for e in entries:
            e.seq.in_flight = True
            self.num_prefill_tokens += max(0, min(e.start + e.num_new, e.seq.admitted_len) - e.start)
        return Batch(entries, len(decodes))

    def _reserve(self, seq: Sequence, n: int, scheduled: set[int]) -> bool:
        """Make room for n more tokens of a running seq, preempting later arrivals if needed."""
        need = blocks_for(seq.num_computed + n, self.block_size) - len(seq.block_ids)
        while not self.allocator.can_allocate(need):
            victim = self._pick_victim(scheduled)
            if victim is None or victim is seq:
                if victim is seq:
                    self._preempt(seq)
                return False
            self._preempt(victim)
        if need > 0:
            seq.block_ids += self.allocator.allocate(need)
        return True

    def _pick_victim(self, scheduled: set[int]) -> Sequence | None:
        """The latest arrival that is neither in the pipeline nor already in this batch."""
        candidates = [s for s in self.running if not s.in_flight and id(s) not in scheduled]
        return max(candidates, key=lambda s: s.arrival) if candidates else None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        # Back to the queue ahead of every later arrival, so preempted work resumes first.
        pos = next((i for i, w in enumerate(self.waiting) if w.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(pos, seq)
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        if self.enable_prefix_caching:
            self._register_computed(seq)  # what it computed stays reusable until evicted
        if seq.block_ids:
            self.allocator.free(seq.block_ids)
            seq.block_ids = []
        seq.num_registered = 0

    # -- prefix caching --------------------------------------------------------
    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks matching the seq's leading full blocks, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        return self.allocator.lookup(self._hashes(seq, (seq.num_tokens - 1) // self.block_size))

    def _register_computed(self, seq: Sequence) -> None:
        """Offer the seq's full blocks whose K/V are written (below num_computed) for sharing."""
        full = seq.num_computed // self.block_size
        if full <= seq.num_registered:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_registered, full):
            self.allocator.register(seq.block_ids[i], hashes[i])
        seq.num_registered = full

    def _hashes(self, seq: Sequence, n: int) -> list[bytes]:
        """The chained hashes of the seq's first n full blocks (its tokens never change, so kept)."""
        bs = self.block_size
        while len(seq.block_hashes) < n:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else None
            seq.block_hashes.append(block_hash(parent, seq.token_slice(i * bs, (i + 1) * bs)))
        return seq.block_hashes[:n]
