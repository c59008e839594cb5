"""After some requests, Ray's Prometheus export has every shardserve metric with non-zero values."""

from __future__ import annotations

import asyncio
import time

import httpx
import ray

from tests.deployments.served_app import API_KEY

SYSTEM = "Answer in the voice of a lighthouse keeper who has seen every storm. " * 6

EXPECTED = [
    "ray_shardserve_requests_total",
    "ray_shardserve_time_to_first_token_seconds_count",
    "ray_shardserve_inter_token_latency_seconds_count",
    "ray_shardserve_request_latency_seconds_count",
    "ray_shardserve_prompt_tokens_total",
    "ray_shardserve_generation_tokens_total",
    "ray_shardserve_running_sequences",
    "ray_shardserve_waiting_sequences",
    "ray_shardserve_kv_cache_usage",
    "ray_shardserve_engine_utilization",
    "ray_shardserve_prefix_cache_hit_tokens_total",
    "ray_shardserve_prefix_cache_query_tokens_total",
    "ray_shardserve_prefill_tokens_computed_total",
    "ray_shardserve_preemptions_total",
]
# Gauges of an engine that has gone idle read zero; they must still be exported.
MAY_BE_ZERO = {
    "ray_shardserve_running_sequences",
    "ray_shardserve_waiting_sequences",
    "ray_shardserve_kv_cache_usage",
    "ray_shardserve_engine_utilization",
}


def scrape() -> dict[str, float]:
    """Sum of each shardserve sample over its tags, from every node's metrics endpoint."""
    totals: dict[str, float] = {}
    for node in ray.nodes():
        text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("ray_shardserve_"):
                name = line.split("{")[0].split(" ")[0]
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def test_metrics_reach_rays_prometheus_export(served):
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def burst():
        # One shared system prompt keeps them on one replica (prefix affinity) and gives prefix-cache
        # hits; together they need more than its 256 KV blocks, so the engine must preempt.
        async with httpx.AsyncClient(timeout=300) as client:

            async def one(i, max_tokens=650):
                body = {
                    "model": "tiny",
                    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"storm {i}"}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                r = await client.post(served.http + "/v1/chat/completions", json=body, headers=headers)
                r.raise_for_status()

            await one(-1, max_tokens=1)  # a replica takes ownership of the prefix
            await asyncio.gather(*(one(i) for i in range(9)))

    asyncio.run(burst())
    httpx.post(served.http + "/v1/completions", json={"model": "nope", "prompt": "x"}, headers=headers, timeout=60)

    deadline = time.monotonic() + 90
    while True:
        totals = scrape()
        missing = [m for m in EXPECTED if m not in totals or (m not in MAY_BE_ZERO and totals[m] <= 0)]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, {m: totals.get(m) for m in missing}
