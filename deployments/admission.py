"""Admission: whether a replica takes one more request, and when a refused client should retry.

A replica holds `max_num_seqs` sequences in its batch; past that, requests wait in its queue, and
`max_queued_requests` bounds that queue (-1: no bound). Only what is beyond the batch's room
counts as queued, so a burst that the batch can absorb is never refused. A refusal's
``Retry-After`` is the time the replica needs, at the rate it has been finishing requests lately,
to make room for one more.
"""

from __future__ import annotations

import math
import time
from collections import deque

DRAIN_WINDOW_S = 30.0  # finishes older than this no longer describe the current rate
MAX_RETRY_AFTER_S = 60


class Admission:
    def __init__(self, max_num_seqs: int, max_queued_requests: int, clock=time.monotonic):
        self.max_num_seqs = max_num_seqs
        self.max_queued_requests = max_queued_requests
        self._clock = clock
        self._finishes: deque[float] = deque()

    def queued(self, running: int, waiting: int) -> int:
        """Requests beyond what the batch holds."""
        return max(0, running + waiting - self.max_num_seqs)

    def admits(self, running: int, waiting: int) -> bool:
        """Whether one more request fits: in the batch, or in the queue's bound."""
        return self.max_queued_requests < 0 or self.queued(running, waiting + 1) <= self.max_queued_requests

    def finished(self) -> None:
        """A request left the replica (finished, failed or cancelled): room was made."""
        now = self._clock()
        self._finishes.append(now)
        self._forget(now)

    def drain_rate(self) -> float | None:
        """Requests finished per second over the recent window; None before any finished."""
        now = self._clock()
        self._forget(now)
        if not self._finishes:
            return None
        span = max(now - self._finishes[0], 1.0)  # a burst of finishes is not an infinite rate
        return len(self._finishes) / span

    def retry_after(self, running: int, waiting: int) -> int:
        """Whole seconds until the queue, draining at the measured rate, has room for one more."""
        rate = self.drain_rate()
        if rate is None:  # nothing finished lately: no rate to go by; ask again soon
            return 1
        ahead = self.queued(running, waiting) - max(self.max_queued_requests, 0) + 1
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(ahead / rate)))

    def _forget(self, now: float) -> None:
        while self._finishes and now - self._finishes[0] > DRAIN_WINDOW_S:
            self._finishes.popleft()
