"""Autoscaling on the engine-utilization signal: a burst scales 1 -> 2 replicas, idle scales back to 1,
a redeploy with a fixed count takes effect under load, and no request fails on the way."""

from __future__ import annotations

import asyncio
import time

import httpx
from ray import serve

from deployments.app import build_app
from tests.deployments.served_app import APP_ARGS

APP = "scale"
ARGS = {
    **APP_ARGS,
    "api_key": None,
    "max_num_seqs": 4,
    "num_replicas": None,
    "autoscaling": {
        "min_replicas": 1,
        "max_replicas": 2,
        "metric": "engine_utilization",
        "target_engine_utilization": 0.2,  # one running sequence of 4 (0.25) is already over target
        "upscale_delay_s": 0,
        "downscale_delay_s": 3,
        "look_back_period_s": 2,
    },
}
LIMIT_S = 120


def running_replicas() -> int:
    return serve.status().applications[APP].deployments["LLMServer"].replica_states.get("RUNNING", 0)


def wait_for(predicate, what: str):
    deadline = time.monotonic() + LIMIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


async def load(url: str, stop: asyncio.Event, n_clients: int) -> list[int]:
    """Clients sending back-to-back requests until told to stop; returns every status code."""
    statuses: list[int] = []
    async with httpx.AsyncClient(timeout=120) as client:

        async def loop(i):
            for _ in range(200):  # bounded even if stop never comes
                body = {"model": "tiny", "prompt": f"load {i}", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
                statuses.append((await client.post(url, json=body)).status_code)
                if stop.is_set():
                    return

        await asyncio.gather(*(loop(i) for i in range(n_clients)))
    return statuses


def run_load_until(url: str, predicate, what: str, n_clients: int) -> list[int]:
    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(load(url, stop, n_clients))
        await asyncio.to_thread(wait_for, predicate, what)
        stop.set()
        return await task

    return asyncio.run(main())


def test_burst_scales_up_idle_scales_down_and_a_redeploy_rescales_without_failures(served, tiny_llama_dir):
    url = f"{served.http}/{APP}/v1/completions"
    args = {**ARGS, "model": str(tiny_llama_dir)}
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    try:
        assert running_replicas() == 1
        statuses = run_load_until(url, lambda: running_replicas() == 2, "scale up to 2", n_clients=3)
        assert set(statuses) == {200}

        statuses = run_load_until(url, lambda: running_replicas() == 1, "scale down to 1", n_clients=0)
        # A fixed count in the config, redeployed while clients keep sending: Serve swaps the
        # replicas in a rolling update that drains each old one, so nothing fails.
        fixed = {**args, "autoscaling": None, "num_replicas": 2}
        serve.run(build_app(fixed), name=APP, route_prefix=f"/{APP}", blocking=False)

        def settled() -> bool:
            app = serve.status().applications[APP]
            return app.status == "RUNNING" and running_replicas() == 2

        statuses = run_load_until(url, settled, "a fixed count of 2", n_clients=2)
        assert set(statuses) == {200}
    finally:
        serve.delete(APP)
