"""Decode attention of one SmolLM2 step: the plain torch path (gather blocks + SDPA) vs the compiled CPU kernel.

Side by side in one run, per dtype, decode count and context range: paged_attention over 30 layers
(9 query heads, 3 KV heads of 64, blocks of 16), each layer with its own cache and the sequences'
blocks scattered, so that the KV streams from memory as in the model. Both paths write the new k/v
first. Best of a few.

    .venv/bin/python bench/bench_attention.py [--threads N] [--dtype float32,bfloat16] [--decodes 1,8,32]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench_linear import best_ms  # noqa: E402
from model import cpu_kernels, ops  # noqa: E402
from model.attention import AttentionMetadata, allocate_kv_cache, paged_attention  # noqa: E402

NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 30, 9, 3, 64, 16
CONTEXTS = [(20, 150), (100, 380), (300, 1000)]  # context lengths drawn uniformly from each range


def make_step(num_decodes: int, lo: int, hi: int, rng: random.Random, dtype):
    lens = [rng.randrange(lo, hi) for _ in range(num_decodes)]
    nblk = -(-max(lens) // BLOCK_SIZE)
    free = list(range(1, num_decodes * nblk + 1))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(nblk)] for _ in lens]
    slots = [t[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE for t, n in zip(tables, lens)]
    caches = allocate_kv_cache((NUM_LAYERS, 2, num_decodes * nblk + 1, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM), dtype, "cpu")
    for c in caches:
        c.normal_()
    q = torch.randn(num_decodes, NUM_HEADS, HEAD_DIM, dtype=dtype)
    k = torch.randn(num_decodes, NUM_KV_HEADS, HEAD_DIM, dtype=dtype)
    v = torch.randn(num_decodes, NUM_KV_HEADS, HEAD_DIM, dtype=dtype)

    def step():  # a fresh metadata per step, as the worker builds it; every layer shares it
        meta = AttentionMetadata(torch.tensor(slots), [1] * num_decodes, lens, torch.tensor(tables),
                                 num_decodes, BLOCK_SIZE)
        for c in caches:
            paged_attention(q, k, v, c, meta, HEAD_DIM ** -0.5)

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--decodes", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    if not cpu_kernels.load():
        print("the CPU kernels could not be built here; nothing to compare", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    print(f"torch {torch.__version__}, {args.threads} threads")
    print("| dtype | decodes | context lengths | 30 layers torch ms | kernel ms | speed-up |")
    print("|---|---|---|---|---|---|")
    use_kernel = ops.decode_kernel
    for name in args.dtype.split(","):
        dtype = getattr(torch, name)
        for n in (int(x) for x in args.decodes.split(",")):
            for lo, hi in CONTEXTS:
                step = make_step(n, lo, hi, rng, dtype)
                ops.decode_kernel = lambda kv_cache: False
                plain = best_ms(step, args.repeats)
                ops.decode_kernel = use_kernel
                kernel = best_ms(step, args.repeats)
                print(f"| {name} | {n} | {lo}..{hi} | {plain:.1f} | {kernel:.1f} | {plain / kernel:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
