"""The LLM-aware autoscaling signal: how full each replica's engine is, not just how many requests it holds.

Serve's default scales on ongoing requests, which counts a 2000-token
generation the same as a 5-token one. ``engine_utilization`` looks inside the
engine instead: a replica whose batch is full, or whose KV cache is nearly
used up by long sequences, is at 1.0, and sequences waiting for room add on
top. ``EngineUtilizationPolicy`` asks for enough replicas to bring the mean
back to the target; Serve applies the config's bounds and delays around it.
"""

from __future__ import annotations

from cluster.protocol import EngineStats


def engine_utilization(stats: EngineStats, max_num_seqs: int) -> float:
    """1.0 = the batch or the KV cache is full; waiting sequences count as extra load."""
    return max(stats.running / max_num_seqs, stats.kv_cache_usage) + stats.waiting / max_num_seqs


class EngineUtilizationPolicy:
    """Serve autoscaling policy: replicas = total engine utilization / target."""

    def __init__(self, target_utilization: float = 0.75):
        self.target_utilization = target_utilization

    def __call__(self, ctx) -> tuple[float, dict]:
        per_replica = (ctx.aggregated_metrics or {}).get("engine_utilization") or {}
        if ctx.current_num_replicas == 0 or not per_replica:
            return ctx.target_num_replicas, {}  # nothing reported yet: stay where we are
        return sum(per_replica.values()) / self.target_utilization, {}
