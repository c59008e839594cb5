"""The linear layers of one SmolLM2 forward pass: F.linear on the checkpoint's layout vs oneDNN packed weights.

Side by side in one run, per dtype and per step size (tokens per step): the 30 layers' four matmuls
(qkv 576->960, o 576->576, gate_up 576->3072, down 1536->576), each layer with its own weights so
that they stream from memory as in the model, and the tied LM head (576->49152). Best of a few.

    .venv/bin/python bench/bench_linear.py [--threads N] [--dtype float32,bfloat16] [--tokens 1,4,32,512]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from model.layers import matmul, onednn_packing_available  # noqa: E402

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (out, in) per matmul of one layer
NUM_LAYERS = 30
LM_HEAD = (49152, 576)


def best_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def run_all(weights, inputs, packed: bool):
    for w, p in weights:
        matmul(inputs[w.shape[1]], w, p if packed else None, None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--tokens", default="1,4,16,32,64,256,512")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads")
    print("| dtype | tokens per step | 30 layers F.linear ms | packed ms | speed-up | LM head F.linear ms | packed ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.dtype.split(","):
        dtype = getattr(torch, name)
        if not onednn_packing_available("cpu", dtype):
            print(f"| {name} | oneDNN packing not available in this torch build |")
            continue
        layers = [torch.randn(s, dtype=dtype) for _ in range(NUM_LAYERS) for s in LAYER_SHAPES]
        layers = [(w, torch.ops.mkldnn._reorder_linear_weight(w, None)) for w in layers]
        head = torch.randn(LM_HEAD, dtype=dtype)
        head = [(head, torch.ops.mkldnn._reorder_linear_weight(head, None))]
        for t in (int(x) for x in args.tokens.split(",")):
            inputs = {n: torch.randn(t, n, dtype=dtype) for n in (576, 1536)}
            cells = []
            for weights in (layers, head):
                plain = best_ms(lambda: run_all(weights, inputs, False), args.repeats)
                packed = best_ms(lambda: run_all(weights, inputs, True), args.repeats)
                cells += [f"{plain:.1f}", f"{packed:.1f}", f"{plain / packed:.2f}x"]
            print(f"| {name} | {t} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
