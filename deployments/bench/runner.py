"""Load patterns and their statistics.

A run sends one request set under one load: at most ``concurrency`` requests in flight, and,
with ``rate``, arrivals spaced by a seeded Poisson process (requests per second). A run is
bounded twice: it sends at most the set's requests, and none after ``max_seconds``; requests
still out ``request_timeout_s`` after that are cancelled and counted as errors.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass

import httpx
import numpy as np

from deployments.bench.client import RequestResult, send
from deployments.bench.datasets import BenchRequest

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Load:
    concurrency: int  # most requests in flight
    rate: float | None = None  # Poisson arrivals per second; None: as fast as concurrency allows

    @property
    def name(self) -> str:
        return f"concurrency {self.concurrency}" if self.rate is None else f"rate {self.rate:g}/s (max {self.concurrency})"


async def run_load(base_url: str, model: str, requests: list[BenchRequest], load: Load, *, max_seconds: float,
                   request_timeout_s: float = 600.0, headers: dict | None = None, seed: int = 0) -> list[RequestResult]:
    if load.concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {load.concurrency}")
    rng = random.Random(seed)
    slots = asyncio.Semaphore(load.concurrency)
    limits = httpx.Limits(max_connections=load.concurrency, max_keepalive_connections=load.concurrency)
    async with httpx.AsyncClient(timeout=request_timeout_s, limits=limits) as client:

        async def one(req: BenchRequest) -> RequestResult:
            try:
                return await send(client, base_url, model, req, headers=headers)
            finally:
                slots.release()

        start = time.perf_counter()
        tasks = []
        for req in requests:
            if load.rate is not None:
                await asyncio.sleep(rng.expovariate(load.rate))
            await slots.acquire()
            if time.perf_counter() - start > max_seconds:
                slots.release()
                break
            tasks.append(asyncio.ensure_future(one(req)))
        if not tasks:
            return []
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, max_seconds - (time.perf_counter() - start)) + request_timeout_s)
        for task in pending:
            task.cancel()
        results = [t.result() for t in done]
        results += [RequestResult(status="error: cancelled at the run's time bound", start_s=start, e2e_s=0.0)
                    for _ in pending]  # fmt: skip
    return results


def summarize(results: list[RequestResult]) -> dict:
    """Throughput over the run's wall time (first send to last answer) and latency statistics in ms."""
    ok = [r for r in results if r.ok]
    errors = Counter(r.status if r.status != "200" else "stream error" for r in results if not r.ok)
    if results:
        first = min(r.start_s for r in results)
        duration = max(r.start_s + r.e2e_s for r in results) - first
    else:
        duration = 0.0
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    rate = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.ttft_s is not None and r.output_tokens > 1]
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": dict(errors),
        "duration_s": duration,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": rate(len(ok)),
        "output_throughput": rate(output_tokens),
        "total_token_throughput": rate(prompt_tokens + output_tokens),
        "ttft_ms": _stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": _stats([gap for r in ok for gap in r.itl_s]),
        "tpot_ms": _stats(tpot),
        "e2e_ms": _stats([r.e2e_s for r in ok]),
        "error_samples": [f"{r.status}: {r.error}" for r in results if not r.ok][:3],  # what went wrong
    }


async def sweep(base_url: str, model: str, requests: list[BenchRequest], loads: list[Load], *, label: str,
                max_seconds: float, warmup: int = 2, headers: dict | None = None, log=print) -> dict:
    """Warm the server up (``warmup`` requests, one at a time, not counted), then run each load in turn."""
    if warmup:
        await run_load(base_url, model, requests[:warmup], Load(1), max_seconds=max_seconds, headers=headers)
    runs = []
    for load in loads:
        summary = summarize(await run_load(base_url, model, requests, load, max_seconds=max_seconds, headers=headers))
        runs.append({"load": asdict(load), **summary})
        log(f"[{label}] {load.name}: {summary['completed']}/{summary['requests']} ok, "
            f"{summary['output_throughput']:.1f} output tok/s, TTFT p50 {_ms(summary['ttft_ms']['p50'])}, "
            f"ITL p50 {_ms(summary['itl_ms']['p50'])}" + (f", errors {summary['errors']}" if summary["errors"] else ""))
    return {"label": label, "base_url": base_url, "model": model, "runs": runs}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _stats(seconds: list[float]) -> dict:
    if not seconds:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    ms = np.asarray(seconds) * 1000.0
    return {"mean": float(ms.mean()), **{f"p{q}": float(np.percentile(ms, q)) for q in PERCENTILES}}
