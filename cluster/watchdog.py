"""How long a step may take before the gang counts as hung.

A worker that stops (SIGSTOP, a collective that never completes, a step far slower than any
recent one) would otherwise leave every request waiting forever. A step's limit is `factor` times
what the slowest recent step would take at this step's size (its time scaled up by the ratio of
tokens, never down), and at least `floor_s`. Before any step has finished there is nothing to go
by (the first steps also build kernels), so the first one gets `first_step_s`.
"""

from __future__ import annotations

from collections import deque


class StepDeadline:
    def __init__(self, floor_s: float = 5.0, factor: float = 10.0, first_step_s: float = 300.0, window: int = 64):
        self.floor_s, self.factor, self.first_step_s = floor_s, factor, first_step_s
        self._recent: deque[tuple[float, int]] = deque(maxlen=window)  # (seconds, tokens) of finished steps

    def timeout(self, tokens: int) -> float:
        """Seconds a step of this many tokens may take."""
        if not self._recent:
            return self.first_step_s
        expected = max(seconds * max(1.0, tokens / max(n, 1)) for seconds, n in self._recent)
        return max(self.floor_s, self.factor * expected)

    def record(self, seconds: float, tokens: int) -> None:
        self._recent.append((seconds, tokens))
