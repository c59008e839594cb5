"""StepDeadline (cluster/watchdog.py): how long a step may take before its gang counts as hung."""

from __future__ import annotations

from cluster.watchdog import StepDeadline


def test_the_first_step_gets_the_generous_limit():
    assert StepDeadline(first_step_s=300.0).timeout(512) == 300.0


def test_limit_is_ten_times_the_slowest_recent_step_scaled_up_to_the_tokens_and_at_least_the_floor():
    d = StepDeadline(floor_s=5.0, factor=10.0)
    d.record(0.03, 1)  # a decode step
    d.record(0.6, 512)  # a full prefill step
    assert d.timeout(1) == 6.0  # 10 x the slowest step, never scaled down
    assert d.timeout(32) == 10 * 0.03 * 32  # the decode step's time per token, scaled up
    d2 = StepDeadline(floor_s=5.0)
    d2.record(0.01, 4)
    assert d2.timeout(4) == 5.0


def test_only_recent_steps_count():
    d = StepDeadline(floor_s=0.1, window=2)
    d.record(9.0, 1)
    d.record(0.01, 1)
    d.record(0.01, 1)
    assert d.timeout(1) == 0.1
