"""Continuous batching rules, without a model: chunking, ordering, preemption, prefix caching, no leaked blocks."""

from cluster.scheduler import Scheduler, SeqStatus
from model.kv_cache import BlockAllocator
from model.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_tokens=16, micro=1, caching=True):
    alloc = BlockAllocator(num_blocks, block_size)
    return alloc, Scheduler(
        alloc,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_tokens,
        num_micro_batches=micro,
        enable_prefix_caching=caching,
    )


def complete(sched, batch, token=7):
    """What the engine does when a step returns: hand the scheduler one token per sampled entry."""
    sched.update(batch, [token] * sum(e.samples for e in batch.entries))


def test_long_prompt_is_chunked_and_new_requests_join_running_batch():
    alloc, s = make(max_tokens=8)
    a = s.add("a", list(range(20)), GREEDY, 0)
    b1 = s.schedule()
    assert [(e.seq.request_id, e.start, e.num_new, e.samples) for e in b1.entries] == [("a", 0, 8, False)]
    complete(s, b1)
    b = s.add("b", [1, 2, 3], GREEDY, 0)
    b2 = s.schedule()
    assert [(e.seq.request_id, e.num_new) for e in b2.entries] == [("a", 8)]  # budget used up by a
    complete(s, b2)
    b3 = s.schedule()
    # a finishes its prompt (4 tokens) and b's prompt (3 tokens) joins the same step
    assert [(e.seq.request_id, e.num_new, e.samples) for e in b3.entries] == [("a", 4, True), ("b", 3, True)]
    complete(s, b3)
    b4 = s.schedule()
    assert b4.num_decodes == 2 and all(e.num_new == 1 for e in b4.entries)
    assert a.status is b.status is SeqStatus.RUNNING


def test_decodes_come_before_prefills():
    _, s = make(max_tokens=64)
    s.add("a", [1, 2], GREEDY, 0)
    complete(s, s.schedule())
    s.add("b", [1, 2, 3, 4, 5], GREEDY, 0)
    batch = s.schedule()
    assert batch.num_decodes == 1
    assert [e.seq.request_id for e in batch.entries] == ["a", "b"]


def test_in_flight_sequences_are_not_scheduled_twice_and_micro_batches_share_work():
    _, s = make(max_tokens=64, micro=2)
    for i in range(4):
        s.add(str(i), [1, 2, 3], GREEDY, 0)
    first = s.schedule()
    second = s.schedule()
    ids1 = {e.seq.request_id for e in first.entries}
    ids2 = {e.seq.request_id for e in second.entries}
    assert len(ids1) == 2 and len(ids2) == 2 and not ids1 & ids2
    assert s.schedule() is None  # everything is inside the pipeline


def test_preemption_frees_blocks_and_recomputes_later_arrival():
    # 5 blocks of 4 tokens: two sequences of 8 prompt tokens each hold 2 blocks, then they grow.
    alloc, s = make(num_blocks=5, block_size=4, max_tokens=64)
    a = s.add("a", list(range(8)), SamplingParams(max_tokens=16, temperature=0.0), 0)
    # Different prompts: with equal ones b would share a's cached blocks and need no preemption.
    b = s.add("b", list(range(100, 108)), SamplingParams(max_tokens=16, temperature=0.0), 0)
    complete(s, s.schedule())  # both prefilled: 4 blocks used, 1 free
    assert alloc.num_free == 1
    complete(s, s.schedule())  # token 9 of each: a takes the last block, b preempted
    assert a.status is SeqStatus.RUNNING and len(a.block_ids) == 3
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and b.block_ids == []
    assert s.num_preemptions == 1
    assert b.output_ids == [7]  # what b generated before is kept and recomputed
    batch = s.schedule()
    assert [e.seq.request_id for e in batch.entries] == ["a"]


def test_finish_and_abort_free_every_block():
    alloc, s = make(max_tokens=64)
    seqs = [s.add(str(i), list(range(10 + i)), GREEDY, 0) for i in range(5)]
    batch = s.schedule()
    complete(s, batch)
    s.finish(seqs[0])
    s.finish(seqs[4])
    s.schedule()  # remaining are now in flight
    for seq in seqs[1:4]:
        s.finish(seq)  # aborted while in flight
    s.finish(seqs[1])  # finishing twice is harmless
    assert alloc.num_free == alloc.num_blocks
    assert s.num_unfinished == 0


def test_admission_waits_when_cache_is_full():
    alloc, s = make(num_blocks=2, block_size=4, max_tokens=64)
    a = s.add("a", list(range(8)), GREEDY, 0)
    b = s.add("b", list(range(4)), GREEDY, 0)
    batch = s.schedule()
    assert [e.seq.request_id for e in batch.entries] == ["a"]
    assert b.status is SeqStatus.WAITING
    complete(s, batch)
    s.finish(a)
    assert [e.seq.request_id for e in s.schedule().entries] == ["b"]


# -- prefix caching (block_size 4) ---------------------------------------------------------------
PREFIX = list(range(40, 52))  # three full blocks


def entries(batch):
    return [(e.seq.request_id, e.start, e.num_new, e.samples) for e in batch.entries]


def test_second_sequence_shares_a_three_block_prefix():
    alloc, s = make(max_tokens=64)
    a = s.add("a", PREFIX + [1, 2], GREEDY, 0)
    complete(s, s.schedule())
    b = s.add("b", PREFIX + [3, 4, 5], GREEDY, 0)
    assert entries(s.schedule()) == [("a", 14, 1, True), ("b", 12, 3, True)]
    assert b.num_computed == 12
    assert b.block_ids[:3] == a.block_ids[:3] and b.block_ids[3] not in a.block_ids
    assert alloc.num_free == alloc.num_blocks - 5  # 4 blocks of a, 1 of b's own
    assert s.prefix_cache_query_tokens == 14 + 15 and s.prefix_cache_hit_tokens == 12
    assert s.num_prefill_tokens == 14 + 3  # a's decode is not prefill


def test_blocks_of_a_step_still_in_flight_are_not_shared():
    _, s = make(max_tokens=64)
    s.add("a", PREFIX + [1], GREEDY, 0)
    s.schedule()  # a's prefill is inside the pipeline: its K/V are not written yet
    b = s.add("b", PREFIX + [2], GREEDY, 0)
    assert entries(s.schedule()) == [("b", 0, 13, True)]
    assert b.num_computed == 0 and s.prefix_cache_hit_tokens == 0


def test_finished_sequence_leaves_its_prefix_cached_and_a_full_match_still_computes_its_last_token():
    alloc, s = make(max_tokens=64)
    a = s.add("a", PREFIX + [1], GREEDY, 0)
    complete(s, s.schedule())
    s.finish(a)
    assert alloc.num_free == alloc.num_blocks and alloc.num_cached == 3
    # Same 13 tokens: 3 blocks found, the 13th token computed so a token is sampled.
    s.add("b", PREFIX + [1], GREEDY, 0)
    assert entries(s.schedule()) == [("b", 12, 1, True)]
    assert alloc.num_cached == 0
    # A prompt of exactly three blocks matches only two: its last block holds the token to sample from.
    s.add("c", PREFIX, GREEDY, 0)
    assert entries(s.schedule()) == [("c", 8, 4, True)]


def test_no_leaks_after_sequences_sharing_prefixes_finish():
    alloc, s = make(num_blocks=16, max_tokens=8)
    seqs = [s.add(str(i), PREFIX + [i] * (i + 1), SamplingParams(max_tokens=3, temperature=0.0), 0) for i in range(5)]
    while s.num_unfinished:
        batch = s.schedule()
        complete(s, batch)
        for e in batch.entries:
            if len(e.seq.output_ids) >= 3:
                s.finish(e.seq)
    assert all(len(q.output_ids) == 3 for q in seqs)
    assert s.prefix_cache_hit_tokens > 0
    assert alloc.num_free == alloc.num_blocks
    assert sorted(alloc.allocate(alloc.num_blocks)) == list(range(16))  # every block can be handed out again


def test_preemption_with_shared_blocks_drops_only_its_references_and_resumes_from_the_cache():
    alloc, s = make(num_blocks=5, block_size=4, max_tokens=64)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    p8 = PREFIX[:8]
    a = s.add("a", p8 + [1, 2, 3], params, 0)
    complete(s, s.schedule())  # a: blocks 0-2
    b = s.add("b", p8 + [4, 5, 6], params, 0)
    complete(s, s.schedule())  # b shares blocks 0-1 and takes block 3
    assert b.block_ids[:2] == a.block_ids[:2]
    complete(s, s.schedule())  # a takes the last block
    assert alloc.num_free == 0
    batch = s.schedule()  # b needs a block: b is the latest arrival, so b is preempted
    assert entries(batch) == [("a", 13, 1, True)]
    assert b.status is SeqStatus.WAITING and b.block_ids == [] and s.num_preemptions == 1
    assert alloc.num_free == 1 and alloc.num_cached == 1  # the shared blocks are still a's
    complete(s, batch)
    s.finish(a)
    # b resumes from its own cached blocks and the shared prefix: only its last token is computed.
    assert entries(s.schedule()) == [("b", 12, 1, True)]
    assert b.output_ids == [7, 7]
    s.finish(b)
    assert alloc.num_free == alloc.num_blocks


def test_prefix_caching_off_shares_nothing():
    alloc, s = make(max_tokens=64, caching=False)
    a = s.add("a", PREFIX + [1], GREEDY, 0)
    complete(s, s.schedule())
    s.finish(a)
    assert alloc.num_cached == 0
    s.add("b", PREFIX + [1], GREEDY, 0)
    assert entries(s.schedule()) == [("b", 0, 13, True)]
    assert s.prefix_cache_query_tokens == s.prefix_cache_hit_tokens == 0


# -- update: tokens in, finish reasons out ---------------------------------------------------------
EOS = 2


def make_limited(num_blocks=64, max_model_len=None, eos=frozenset({EOS})):
    """A scheduler that knows the EOS ids and, optionally, the context length."""
    alloc = BlockAllocator(num_blocks, 4)
    return alloc, Scheduler(
        alloc, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=max_model_len, eos_token_ids=eos
    )


def step(sched, tokens):
    """Schedule one batch and return what update makes of it, as (request_id, row) pairs."""
    batch = sched.schedule()
    return [(seq.request_id, row) for seq, row in sched.update(batch, tokens)]


def test_eos_finishes_with_stop_unless_ignore_eos():
    """EOS ends a sequence ("stop") and it is still returned with its last token; ignore_eos goes on."""
    _, s = make_limited()
    a = s.add("a", [1, 3, 4], SamplingParams(max_tokens=8, temperature=0.0), 0)
    b = s.add("b", [1, 3, 5], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), 0)
    assert step(s, [EOS, EOS]) == [("a", 0), ("b", 1)]
    assert a.status is SeqStatus.FINISHED and a.finish_reason == "stop" and a.output_ids == [EOS]
    assert b.status is SeqStatus.RUNNING and b.finish_reason is None and b.output_ids == [EOS]
    assert [e.seq.request_id for e in s.schedule().entries] == ["b"]


def test_stop_token_ids_finish_with_stop_only_for_the_sequence_that_asked():
    """A token in params.stop_token_ids ends that sequence ("stop"); the same token elsewhere does not."""
    _, s = make_limited()
    a = s.add("a", [1, 3], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=(9,)), 0)
    b = s.add("b", [1, 4], SamplingParams(max_tokens=8, temperature=0.0), 0)
    assert step(s, [5, 5]) == [("a", 0), ("b", 1)]
    assert a.status is SeqStatus.RUNNING  # a token not in stop_token_ids goes on
    assert step(s, [9, 9]) == [("a", 0), ("b", 1)]
    assert (a.status, a.finish_reason, a.output_ids) == (SeqStatus.FINISHED, "stop", [5, 9])
    assert (b.status, b.finish_reason) == (SeqStatus.RUNNING, None)


def test_max_tokens_reached_finishes_with_length():
    """The max_tokens-th token ends the sequence with "length", not one token earlier or later."""
    _, s = make_limited()
    a = s.add("a", [1, 3, 4], SamplingParams(max_tokens=3, temperature=0.0), 0)
    step(s, [5])
    step(s, [6])
    assert a.status is SeqStatus.RUNNING and a.finish_reason is None
    assert step(s, [7]) == [("a", 0)]
    assert (a.status, a.finish_reason, a.output_ids) == (SeqStatus.FINISHED, "length", [5, 6, 7])
    assert s.schedule() is None


def test_max_model_len_reached_finishes_with_length():
    """A sequence reaching max_model_len tokens (prompt + output) ends with "length" before max_tokens."""
    _, s = make_limited(max_model_len=6)
    a = s.add("a", [1, 3, 4, 5], SamplingParams(max_tokens=16, temperature=0.0), 0)
    step(s, [6])
    assert a.status is SeqStatus.RUNNING and a.num_tokens == 5
    step(s, [7])
    assert (a.status, a.finish_reason, a.num_tokens) == (SeqStatus.FINISHED, "length", 6)


def test_without_max_model_len_only_max_tokens_limits():
    """max_model_len=None: a sequence runs until its max_tokens, however long it grows."""
    _, s = make_limited(max_model_len=None)
    a = s.add("a", [1, 3, 4, 5], SamplingParams(max_tokens=5, temperature=0.0), 0)
    for t in range(4):
        step(s, [10 + t])
    assert a.status is SeqStatus.RUNNING
    step(s, [20])
    assert (a.finish_reason, a.num_tokens) == ("length", 9)


def test_sequence_finished_by_update_frees_its_blocks_at_once():
    """The step that finishes a sequence returns all its blocks before the next schedule."""
    alloc, s = make_limited(num_blocks=8)
    a = s.add("a", list(range(10, 19)), SamplingParams(max_tokens=8, temperature=0.0), 0)
    step(s, [5])
    assert alloc.num_free == alloc.num_blocks - 3 and len(a.block_ids) == 3
    step(s, [EOS])
    assert a.block_ids == [] and alloc.num_free == alloc.num_blocks
    assert s.num_unfinished == 0


def test_sequence_aborted_while_in_flight_is_skipped_and_the_others_advance():
    """finish(seq) during a step: update appends nothing to it and does not return it; the other
    entries (a sampling one and a prefill chunk) advance, each sampled one taking its own row."""
    alloc = BlockAllocator(64, 4)
    s = Scheduler(alloc, max_num_seqs=8, max_num_batched_tokens=12, eos_token_ids=frozenset({EOS}))
    params = SamplingParams(max_tokens=8, temperature=0.0)
    a = s.add("a", [1, 3], params, 0)
    b = s.add("b", [1, 4, 5], params, 0)
    c = s.add("c", list(range(20, 40)), params, 0)
    batch = s.schedule()
    assert [(e.seq.request_id, e.num_new, e.samples) for e in batch.entries] == [
        ("a", 2, True), ("b", 3, True), ("c", 7, False)
    ]  # fmt: skip
    s.finish(a)
    assert alloc.num_free == alloc.num_blocks - 1 - 2  # a's block came back at once; b's 1 and c's 2 are held
    assert [(seq.request_id, row) for seq, row in s.update(batch, [EOS, 6])] == [("b", 1)]
    assert a.output_ids == [] and (a.status, a.finish_reason) == (SeqStatus.FINISHED, "abort")
    assert not a.in_flight and a.num_computed == 0
    assert b.output_ids == [6] and b.num_computed == 3 and b.status is SeqStatus.RUNNING
    assert c.output_ids == [] and c.num_computed == 7 and not c.in_flight
    nxt = s.schedule()
    assert [(e.seq.request_id, e.start, e.num_new) for e in nxt.entries] == [("b", 3, 1), ("c", 7, 11)]
