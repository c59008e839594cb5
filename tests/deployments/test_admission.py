"""Admission (deployments/admission.py): only what is beyond the batch counts as queued, and a
refusal's Retry-After follows the measured drain rate."""

from __future__ import annotations

from deployments.admission import MAX_RETRY_AFTER_S, Admission


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_the_batch_can_hold_is_never_refused():
    a = Admission(max_num_seqs=8, max_queued_requests=0)
    # Everything waiting (not yet scheduled) still fits the batch: nothing is queued.
    assert a.queued(running=0, waiting=8) == 0
    assert a.admits(running=0, waiting=7)
    assert a.admits(running=3, waiting=4)
    assert not a.admits(running=8, waiting=0)  # the batch is full and the queue may hold none


def test_the_queue_bound_counts_only_what_waits_beyond_the_batch():
    a = Admission(max_num_seqs=4, max_queued_requests=2)
    assert a.admits(running=4, waiting=1)
    assert not a.admits(running=4, waiting=2)
    assert Admission(max_num_seqs=4, max_queued_requests=-1).admits(running=4, waiting=10_000)


def test_retry_after_follows_the_drain_rate():
    clock = Clock()
    a = Admission(max_num_seqs=4, max_queued_requests=2, clock=clock)
    assert a.retry_after(running=4, waiting=2) == 1  # nothing finished yet: no rate to go by
    for _ in range(10):  # one request finished every 2 s
        clock.now += 2.0
        a.finished()
    assert abs(a.drain_rate() - 10 / 18) < 1e-9
    # 3 requests are ahead of the next one (2 queued beyond the bound's room, + itself): 3 / 0.56 per s
    assert a.retry_after(running=4, waiting=4) == 6
    clock.now += 1000  # the rate is forgotten once it is old
    assert a.drain_rate() is None


def test_retry_after_is_bounded():
    clock = Clock()
    a = Admission(max_num_seqs=1, max_queued_requests=0, clock=clock)
    a.finished()
    clock.now += 29.0
    assert a.retry_after(running=1, waiting=10_000) == MAX_RETRY_AFTER_S
