"""The autoscaling block maps onto Serve's options, and the engine-utilization signal and policy (no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig

from cluster.protocol import EngineStats
from deployments.autoscaling import EngineUtilizationPolicy, engine_utilization
from deployments.config import AutoscalingConfig
from deployments.llm_server import serve_autoscaling_config


def test_default_block_is_serves_request_based_autoscaling():
    out = serve_autoscaling_config(AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=8))
    assert "policy" not in out  # Serve's own policy: ongoing requests per replica
    serve_config = ServeAutoscalingConfig(**out)
    assert (serve_config.min_replicas, serve_config.max_replicas, serve_config.target_ongoing_requests) == (1, 4, 8)


def test_engine_utilization_block_names_our_policy_and_serve_accepts_it():
    out = serve_autoscaling_config(AutoscalingConfig(metric="engine_utilization", target_engine_utilization=0.5))
    assert out["policy"] == {
        "policy_function": "deployments.autoscaling:EngineUtilizationPolicy",
        "policy_kwargs": {"target_utilization": 0.5},
    }
    ServeAutoscalingConfig(**out)


def stats(running=0, waiting=0, free=100, total=100):
    return EngineStats(running=running, waiting=waiting, kv_blocks_free=free, kv_blocks_total=total, kv_blocks_cached=0,
                       preemptions=0, prefix_cache_query_tokens=0, prefix_cache_hit_tokens=0, prefill_tokens_computed=0)


def test_a_replica_full_of_long_sequences_counts_as_busy():
    assert engine_utilization(stats(), 32) == 0
    assert engine_utilization(stats(running=8), 32) == pytest.approx(0.25)
    # 2 long generations holding 90% of the KV cache: busy, though only 2 requests are in flight.
    assert engine_utilization(stats(running=2, free=10), 32) == pytest.approx(0.9)
    assert engine_utilization(stats(running=32, waiting=16), 32) == pytest.approx(1.5)


def ctx(per_replica: dict, current=2, target=2):
    return SimpleNamespace(
        current_num_replicas=current,
        target_num_replicas=target,
        aggregated_metrics={"engine_utilization": per_replica} if per_replica is not None else {},
    )


def test_policy_asks_for_total_utilization_over_target():
    policy = EngineUtilizationPolicy(target_utilization=0.5)
    assert policy(ctx({"a": 0.9, "b": 0.6}))[0] == pytest.approx(3.0)
    assert policy(ctx({"a": 0.1, "b": 0.0}))[0] == pytest.approx(0.2)  # Serve clamps to min_replicas
    assert policy(ctx(None, current=2, target=2))[0] == 2  # nothing reported yet: hold
