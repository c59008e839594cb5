"""The element-wise and attention ops of the model math, each on its compiled CPU kernel or in torch.

This is the one place that asks whether the compiled kernels (model/csrc, loaded by
model/cpu_kernels.py) take a tensor: loaded, on the CPU, float32 or bfloat16. Where they do
not (CUDA, float16, a machine that cannot build them, SHARDSERVE_CPU_KERNELS=0) the same
computation runs in plain torch, equal up to float rounding. Model code calls these functions
and never asks which path ran.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model import cpu_kernels


def fused(t: Tensor) -> bool:
    """Whether the compiled element-wise kernels run on t."""
    return cpu_kernels.usable(t)


def decode_kernel(kv_cache: Tensor) -> bool:
    """Whether decodes over this KV cache run in the compiled paged-attention kernel."""
    return cpu_kernels.usable(kv_cache)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if x.dim() == 2 and fused(x):
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        torch.ops.shardserve.rms_norm(out, x, weight, eps)
        return out
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    # Half precision: normalize in float32, round, then scale (as the reference implementation does).
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(norm(residual + x), residual + x), in one pass on CPU; x and residual may be overwritten."""
    if x.dim() == 2 and fused(x):
        torch.ops.shardserve.add_rms_norm(x, residual, weight, eps)
        return x, residual
    residual = residual + x
    return rms_norm(residual, weight, eps), residual


def rotary(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """RoPE in the half-split layout on x (T, heads, hd), which may be rotated in place.

    rope(x) = x * cos + roll(x, hd/2) * sin_signed, with sin_signed = [-sin, sin] (T, 1, hd):
    roll(x, hd/2) = [x2, x1], so this equals x * cos + [-x2, x1] * sin.
    """
    if fused(x):
        torch.ops.shardserve.rotary(x, cos.view(x.shape[0], -1), sin_signed.view(x.shape[0], -1))
        return x
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def silu_and_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for the fused [gate | up] projection output (T, 2 n) -> (T, n)."""
    if fused(gate_up):
        out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        torch.ops.shardserve.silu_and_mul(out, gate_up)
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


GEMV_MAX_ROWS = 2  # up to here the compiled GEMV streams weights faster than oneDNN (bench/bench_linear.py)


def gemv_takes(x: Tensor) -> bool:
    """Whether a matmul of x (rows, in) runs in the compiled GEMV: a decode step of one or two tokens."""
    return x.dim() == 2 and 0 < x.shape[0] <= GEMV_MAX_ROWS and fused(x)


def gemv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x W^T + b from W as loaded ([out, in]), each thread streaming its own run of rows. Only where gemv_takes(x)."""
    out = x.new_empty(x.shape[0], weight.shape[0])
    torch.ops.shardserve.gemv(out, x, weight, bias)
    return out


def paged_decode_attention(q: Tensor, kv_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
                           scale: float) -> Tensor:
    """The compiled kernel's attention of one query per sequence over its paged KV blocks, read
    where they lie. q (D, nh, hd); returns (D, nh * hd). Only where decode_kernel(kv_cache)."""
    nd, nh, hd = q.shape
    if q.stride(2) != 1 or q.stride(1) != hd:  # the kernel takes strided rows, but packed heads
        q = q.contiguous()
    out = q.new_empty(nd, nh, hd)
    torch.ops.shardserve.paged_decode_attention(out, q, kv_cache, block_tables, context_lens, scale)
    return out.view(nd, nh * hd)
