"""What the serving path costs: the same requests to the engine in-process and to `shardserve serve` over HTTP.

One run, side by side on this machine, the bundled SmolLM2-135M-Instruct, greedy, ignore_eos:
  - batch-1 decode: a chat prompt, 128 new tokens; inter-token latency (p50 of the gaps between
    tokens) and its mean, best of --repeats;
  - time to first token of a 1-token request (p50 of --ttft-requests): the whole round trip.
In-process, the engine (its worker a Ray actor with the threads `shardserve serve` would give
it) runs alone; then it is shut down and `shardserve serve` starts with the same engine settings,
and the same requests go over HTTP with the streaming client of `shardserve bench`.

    .venv/bin/python bench/serving_overhead.py [--dtype float32] [--repeats 3] [--ttft-requests 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from cluster.config import EngineConfig  # noqa: E402
from cluster.engine import LLMEngine  # noqa: E402
from cluster.protocol import GenerateRequest  # noqa: E402
from deployments.bench import peers, runner  # noqa: E402
from deployments.bench.datasets import BenchRequest  # noqa: E402
from deployments.config import AppConfig  # noqa: E402
from deployments.cli import local_cpus_per_worker  # noqa: E402
from model.sampling_params import SamplingParams  # noqa: E402
from model.sources import DEFAULT_MODEL  # noqa: E402

DECODE = BenchRequest([{"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."}], 128)
FIRST = BenchRequest([{"role": "user", "content": "Say one word."}], 1)


def p50_ms(gaps: list[float]) -> float:
    return 1000 * statistics.median(gaps)


async def in_process(config: EngineConfig, repeats: int, ttft_requests: int) -> dict:
    engine = LLMEngine(config)
    try:

        async def stream(req: BenchRequest) -> list[float]:
            params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
            start, times = time.perf_counter(), []
            async for _ in engine.generate(GenerateRequest(req.messages, params)):
                times.append(time.perf_counter())
            return [start] + times

        await stream(DECODE)  # warm-up
        decodes = [await stream(DECODE) for _ in range(repeats)]
        ttfts = [(t[1] - t[0]) for t in [await stream(FIRST) for _ in range(ttft_requests)]]
        return _summary([[b - a for a, b in zip(t[1:], t[2:])] for t in decodes], ttfts)
    finally:
        await engine.shutdown()


def over_http(config: AppConfig, repeats: int, ttft_requests: int, log_dir: Path) -> dict:
    port = peers.free_port()
    cmd = [sys.executable, "-m", "deployments.cli", "serve", "--port", str(port), "--grpc-port", str(peers.free_port()),
           "--dtype", config.dtype, "--cpus-per-worker", str(config.cpus_per_worker)]  # fmt: skip
    log = log_dir / "serving_overhead-serve.log"
    proc = peers.start(cmd, {}, log)
    try:
        url = f"http://127.0.0.1:{port}"
        peers.wait_ready(url, proc, log)

        async def run(req: BenchRequest, n: int):
            return await runner.run_load(url, DEFAULT_MODEL, [req] * n, runner.Load(1), max_seconds=600)

        asyncio.run(run(DECODE, 1))  # warm-up
        decodes = asyncio.run(run(DECODE, repeats))
        firsts = asyncio.run(run(FIRST, ttft_requests))
        assert all(r.ok for r in decodes + firsts), [r.error for r in decodes + firsts if not r.ok]
        return _summary([r.itl_s for r in decodes], [r.ttft_s for r in firsts])
    finally:
        peers.stop(proc)


def _summary(decode_gaps: list[list[float]], ttfts: list[float]) -> dict:
    best = min(decode_gaps, key=statistics.mean)
    return {"itl_p50_ms": p50_ms(best), "itl_mean_ms": 1000 * statistics.mean(best), "ttft_1_token_p50_ms": p50_ms(ttfts)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ttft-requests", type=int, default=20)
    ap.add_argument("--out-json", default=None)
    args = ap.parse_args(argv)
    app = AppConfig(dtype=args.dtype)
    app = app.model_copy(update={"cpus_per_worker": local_cpus_per_worker(app, os.cpu_count() or 1)})
    engine = app.engine_config()
    results = {"dtype": args.dtype, "cpus_per_worker": app.cpus_per_worker}
    results["in_process"] = asyncio.run(in_process(engine, args.repeats, args.ttft_requests))
    print(f"in-process: {results['in_process']}", flush=True)
    results["http"] = over_http(app, args.repeats, args.ttft_requests, Path("/tmp"))
    print(f"over HTTP:  {results['http']}", flush=True)
    ip, http = results["in_process"], results["http"]
    print("\n| dtype | | ITL p50 ms | ITL mean ms | 1-token TTFT p50 ms |\n|---|---|---|---|---|")
    for name, r in (("in-process engine", ip), ("shardserve serve over HTTP", http)):
        print(f"| {args.dtype} | {name} | {r['itl_p50_ms']:.1f} | {r['itl_mean_ms']:.1f} | {r['ttft_1_token_p50_ms']:.1f} |")
    print(f"| | HTTP / in-process | {http['itl_p50_ms'] / ip['itl_p50_ms']:.2f}x | "
          f"{http['itl_mean_ms'] / ip['itl_mean_ms']:.2f}x | {http['ttft_1_token_p50_ms'] - ip['ttft_1_token_p50_ms']:+.1f} ms |")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
