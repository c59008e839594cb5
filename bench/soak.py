"""A long run with faults in it: many requests, some cancelled mid-stream, a worker killed midway.

The engine as a replica runs it (its worker a Ray actor, `worker_process: separate`), driven
directly: `--requests` chat requests of the bundled SmolLM2 (prompts from the bench chat set,
max_tokens 8..64, greedy), `--concurrency` at a time; each request is cancelled after a random
number of tokens with probability `--cancel-share`; when half the requests have been sent, the
worker is sent SIGKILL. At the end it reports requests completed, cancelled and failed, KV blocks
free against the total (nothing leaked), gangs started, and the worker's RSS after the first 50
requests and at the end (the new worker's, after the kill).

    .venv/bin/python bench/soak.py [--requests 1000] [--concurrency 8] [--cancel-share 0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from cluster.config import EngineConfig  # noqa: E402
from cluster.engine import LLMEngine  # noqa: E402
from cluster.protocol import EngineDeadError, GenerateRequest  # noqa: E402
from deployments.bench import datasets  # noqa: E402
from model.sampling_params import SamplingParams  # noqa: E402


def worker_pid(engine: LLMEngine) -> int:
    import ray

    return ray.get(engine.gang.workers[0].__ray_call__.remote(lambda self: os.getpid()))


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


async def soak(engine: LLMEngine, n: int, concurrency: int, cancel_share: float, seed: int) -> dict:
    rng = random.Random(seed)
    prompts = [r.messages for r in datasets.chat(64)]
    counts = {"completed": 0, "cancelled": 0, "failed": 0}
    rss = {}
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        params = SamplingParams(max_tokens=rng.randint(8, 64), temperature=0.0)
        cancel_after = rng.randint(1, 8) if rng.random() < cancel_share else None
        async with gate:
            if i == n // 2:
                os.kill(worker_pid(engine), signal.SIGKILL)
            if i == 50:
                rss["worker_after_50_requests_mb"] = rss_mb(worker_pid(engine))
            seen = 0
            try:
                async for out in engine.generate(GenerateRequest(prompts[i % len(prompts)], params)):
                    seen += len(out.token_ids)
                    if cancel_after is not None and seen >= cancel_after and not out.finished:
                        counts["cancelled"] += 1
                        return  # leaving the loop closes the stream: the engine drops the request
                counts["completed"] += 1
            except EngineDeadError:
                counts["failed"] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    stats = engine.stats()
    return {
        "requests": n,
        **counts,
        "seconds": time.monotonic() - t0,
        "gangs_started": 1 + engine.num_recoveries,
        "kv_blocks_free": stats.kv_blocks_free,
        "kv_blocks_total": stats.kv_blocks_total,
        "running_after": stats.running,
        "waiting_after": stats.waiting,
        **rss,
        "worker_at_end_mb": rss_mb(worker_pid(engine)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--cancel-share", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-json", default=None)
    args = ap.parse_args(argv)
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    engine = LLMEngine(EngineConfig(cpus_per_worker=max(0.1, (os.cpu_count() or 1) - 0.2)))
    try:
        result = asyncio.run(soak(engine, args.requests, args.concurrency, args.cancel_share, args.seed))
    finally:
        asyncio.run(engine.shutdown())
        ray.shutdown()
    print(json.dumps(result, indent=2))
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
