"""One worker step of SmolLM2 (real weights, real loader, no Ray): what each compiled CPU kernel adds.

Side by side in one run, per dtype and step kind, the same step with
  - plain torch: no compiled kernels (as where they cannot be built);
  - attention kernel: decode attention compiled, element-wise ops in torch;
  - all kernels: decode attention and the fused norm/RoPE/SiLU ops (the default).
The three run in turn within each repeat, so that a slow spell of the machine hits all of them.
Steps: a prefill of 6 prompts making 512 tokens; decodes of 32 sequences with contexts of 20..150
over scattered blocks; a decode of one sequence. Best of the repeats.

    .venv/bin/python bench/bench_step.py [--dtype float32,bfloat16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from cluster.config import EngineConfig  # noqa: E402
from cluster.worker import StepInput, Worker  # noqa: E402
from model import cpu_kernels, ops  # noqa: E402
from model.sampling import SamplingParams  # noqa: E402
from model.sources import resolve_model  # noqa: E402

BLOCK_SIZE, NUM_BLOCKS = 16, 2048
STEPS = {  # name: (tokens already cached per sequence, new tokens per sequence)
    "prefill 512": ([0] * 6, [100, 80, 120, 60, 90, 62]),
    "decode 32": (None, [1] * 32),
    "decode 1": ([100], [1]),
}


def make_step(cached: list[int] | None, new: list[int], rng: random.Random) -> StepInput:
    cached = cached or [rng.randrange(20, 150) for _ in new]
    free = list(range(1, NUM_BLOCKS))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-(c + n) // BLOCK_SIZE))] for c, n in zip(cached, new)]
    tokens, positions, slots, sample_rows = [], [], [], []
    for table, c, n in zip(tables, cached, new):
        for p in range(c, c + n):
            tokens.append(rng.randrange(100, 40000))
            positions.append(p)
            slots.append(table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
        sample_rows.append(len(tokens) - 1)
    width = max(map(len, tables))
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    return StepInput(
        token_ids=tokens, positions=positions, slot_mapping=slots, query_lens=new,
        context_lens=[c + n for c, n in zip(cached, new)], block_tables=[t + [0] * (width - len(t)) for t in tables],
        num_decodes=sum(n == 1 for n in new), sample_rows=sample_rows, sampling=[greedy] * len(new),
        seeds=[0] * len(new), steps=[0] * len(new))


def use(mode: str, usable) -> None:
    """Point the model's kernel switches (model/ops.py) at one of the three configurations."""
    ops.fused = usable if mode == "all kernels" else (lambda t: False)
    ops.decode_kernel = (lambda kv_cache: False) if mode == "plain torch" else usable


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if not cpu_kernels.load():
        print("the CPU kernels could not be built here; nothing to compare", file=sys.stderr)
        return 1
    model_dir = resolve_model(None)
    modes = ["plain torch", "attention kernel", "all kernels"]
    usable = cpu_kernels.usable
    print(f"torch {torch.__version__}, {args.threads} threads, SmolLM2-135M, layout 1x1")
    print("| dtype | step | plain torch ms | attention kernel ms | all kernels ms | all vs plain |")
    print("|---|---|---|---|---|---|")
    for name in args.dtype.split(","):
        config = EngineConfig(dtype=name, block_size=BLOCK_SIZE, cpus_per_worker=args.threads)
        worker = Worker(0, config, str(model_dir))
        worker.load()
        worker.init_cache(NUM_BLOCKS)
        rng = random.Random(0)
        for step_name, (cached, new) in STEPS.items():
            step = make_step(cached, new, rng)
            best = dict.fromkeys(modes, float("inf"))
            for round_ in range(args.repeats + 1):
                for mode in modes:
                    use(mode, usable)
                    t0 = time.perf_counter()
                    worker.execute(step)
                    if round_:  # round 0 warms up
                        best[mode] = min(best[mode], time.perf_counter() - t0)
            cells = [f"{best[m] * 1e3:.1f}" for m in modes]
            print(f"| {name} | {step_name} | " + " | ".join(cells)
                  + f" | {best['plain torch'] / best['all kernels']:.2f}x |", flush=True)
        use("all kernels", usable)
    return 0


if __name__ == "__main__":
    sys.exit(main())
