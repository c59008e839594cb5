"""A worker's memory over many requests of varied length: step sizes rounded to size classes, or not.

oneDNN builds and caches a kernel for every distinct row count a matmul sees; step sizes follow
prompt lengths, so a worker that runs every size grows by hundreds of MB. model/layers.step_rows
rounds a step's rows up to one of 56 size classes (up to 512). This runs the engine in-process
(tp = pp = 1, so the worker is this process) on a random-weight model of SmolLM2's shapes (hidden
576, intermediate 1536, vocab 49152; 4 layers instead of 30, since the kernels are per shape, not
per layer), float32, and sends `--warmup` requests then `--requests` more, prompt lengths drawn
from 1..1000, 8 at a time, max_tokens 1; it reports this process's RSS after each part, with the
size classes on and off (each in a fresh process).

    .venv/bin/python bench/memory_soak.py [--requests 1000] [--warmup 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere


def model_dir() -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_tokenizer import save_tiny_tokenizer

    path = Path(tempfile.mkdtemp(prefix="shardserve-soak-"))
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    save_tiny_tokenizer(path, 320)  # the engine needs one; requests are token ids
    return path


async def soak(path: Path, warmup: int, requests: int) -> dict:
    import psutil

    from cluster.config import EngineConfig
    from cluster.engine import LLMEngine
    from cluster.protocol import GenerateRequest
    from model.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(path), max_model_len=2048, num_kv_blocks=1024,
                                    worker_process="in_process"))  # this process's RSS is the worker's
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, temperature=0.0)

    async def one():
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(1, 1000))]
        async for _ in engine.generate(GenerateRequest(prompt, params)):
            pass

    async def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n // 8):
            await asyncio.gather(*(one() for _ in range(8)))
        return time.perf_counter() - start

    rss = lambda: psutil.Process().memory_info().rss / 2**20  # noqa: E731
    try:
        before = rss()
        warm_s = await run(warmup)
        after_warmup = rss()
        soak_s = await run(requests)
        after = rss()
    finally:
        await engine.shutdown()
    return {"rss_mb_start": before, "rss_mb_after_warmup": after_warmup, "rss_mb_after_soak": after,
            "growth_during_soak_mb": after - after_warmup, "warmup_s": warm_s, "soak_s": soak_s}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--exact-rows", action="store_true", help="(one run) turn the size classes off")
    ap.add_argument("--model-dir", default=None, help="(one run) the model to use")
    args = ap.parse_args(argv)
    if args.model_dir:  # one run, in this process
        if args.exact_rows:
            from model import layers

            layers.step_rows = lambda rows: rows
        print(json.dumps(asyncio.run(soak(Path(args.model_dir), args.warmup, args.requests))))
        return 0
    path = model_dir()
    results = {}
    for name, flag in (("size classes", []), ("exact rows", ["--exact-rows"])):
        cmd = [sys.executable, __file__, "--model-dir", str(path), "--warmup", str(args.warmup),
               "--requests", str(args.requests), *flag]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    print("\n| step rows | RSS after warm-up MB | after the soak MB | growth MB | soak s |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rss_mb_after_warmup']:.0f} | {r['rss_mb_after_soak']:.0f} | "
              f"{r['growth_during_soak_mb']:+.0f} | {r['soak_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
