"""After some requests, Ray's Prometheus export has every shardserve metric (vLLM's names where vLLM has
one) with non-zero values, and a Prometheus run as `shardserve monitor` runs it holds them."""

from __future__ import annotations

import time

import httpx
import pytest
import ray

from deployments import monitor
from tests.deployments.served_app import AUTH, greedy_chat, post_chats
from tests.ports import free_port

SYSTEM = "Answer in the voice of a lighthouse keeper who has seen every storm. " * 6

EXPECTED = [
    "ray_shardserve_requests_total",
    "ray_vllm_time_to_first_token_seconds_count",
    "ray_vllm_inter_token_latency_seconds_count",
    "ray_vllm_request_time_per_output_token_seconds_count",
    "ray_vllm_e2e_request_latency_seconds_count",
    "ray_vllm_request_prompt_tokens_count",
    "ray_vllm_request_generation_tokens_count",
    "ray_vllm_prompt_tokens_total",
    "ray_vllm_generation_tokens_total",
    "ray_vllm_request_success_total",
    "ray_vllm_num_requests_running",
    "ray_vllm_num_requests_waiting",
    "ray_vllm_kv_cache_usage_perc",
    "ray_shardserve_engine_utilization",
    "ray_vllm_prefix_cache_hits_total",
    "ray_vllm_prefix_cache_queries_total",
    "ray_shardserve_prefill_tokens_computed_total",
    "ray_vllm_num_preemptions_total",
]
# Gauges of an engine that has gone idle read zero; they must still be exported.
MAY_BE_ZERO = {
    "ray_vllm_num_requests_running",
    "ray_vllm_num_requests_waiting",
    "ray_vllm_kv_cache_usage_perc",
    "ray_shardserve_engine_utilization",
}
PREFIXES = ("ray_shardserve_", "ray_vllm_")


def scrape() -> dict[str, float]:
    """Sum of each shardserve sample over its tags, from every node's metrics endpoint."""
    totals: dict[str, float] = {}
    for node in ray.nodes():
        text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(PREFIXES):
                name = line.split("{")[0].split(" ")[0]
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def test_metrics_reach_rays_prometheus_export(served):
    # One shared system prompt gives prefix-cache hits (and mostly keeps them on one replica). However
    # the router splits the 14, one replica holds 7 or more: 7 x 650 tokens are more than its 256 KV
    # blocks of 16, so the engine must preempt.
    post_chats(served.http, [greedy_chat(SYSTEM, "storm -1", max_tokens=1)])  # a replica takes the prefix
    post_chats(served.http, [greedy_chat(SYSTEM, f"storm {i}", max_tokens=650) for i in range(14)])
    httpx.post(served.http + "/v1/completions", json={"model": "nope", "prompt": "x"}, headers=AUTH, timeout=60)

    deadline = time.monotonic() + 90
    while True:
        totals = scrape()
        missing = [m for m in EXPECTED if m not in totals or (m not in MAY_BE_ZERO and totals[m] <= 0)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, {m: totals.get(m) for m in missing}


@pytest.mark.skipif(monitor.find_prometheus() is None, reason="no prometheus on PATH (make's set-up installs it as root)")
def test_prometheus_from_shardserve_monitor_holds_shardserve_series(served, tmp_path):
    # Prometheus as `shardserve monitor` runs it, over this session's nodes (this test cluster runs
    # without the dashboard that writes the target file, so the test writes it as the dashboard does).
    targets = tmp_path / monitor.TARGETS_FILE
    nodes = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]]
    monitor.write_targets(targets, nodes)
    post_chats(served.http, [greedy_chat(SYSTEM, "storm watch", max_tokens=8)])
    port = free_port()
    prometheus = monitor.start_prometheus(monitor.find_prometheus(), tmp_path / "monitor", targets, "127.0.0.1", port, 1)
    url = f"http://127.0.0.1:{port}"
    wanted = ["ray_vllm_generation_tokens_total", "ray_vllm_time_to_first_token_seconds_count",
              "ray_shardserve_requests_total"]  # fmt: skip
    try:
        monitor.wait_ready(url, prometheus)
        deadline = time.monotonic() + 60
        while True:
            values = {name: monitor.query(url, f"sum({name})") for name in wanted}
            if all(values.values()) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert all(v > 0 for v in values.values()), values
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
