"""The fused element-wise CPU ops (model/csrc/fused_ops.cpp) against the plain torch they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import cpu_kernels
from model.layers import RMSNorm
from model.ops import rotary as apply_rope

DTYPES = [torch.float32, torch.bfloat16]


def _assert_close(actual, expected):
    # float32: a different summation order moves the norm by an ulp or two. bfloat16: the same
    # intermediates are rounded, so a result differs at most where float32 sums round across a bf16 step.
    tol = dict(rtol=1e-6, atol=1e-6) if actual.dtype == torch.float32 else dict(rtol=2**-8, atol=0)
    torch.testing.assert_close(actual, expected, **tol)


def _reference_norm(x, weight, eps):
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_rms_norm_and_residual_add(compiled_cpu_ops, dtype, rows):
    torch.manual_seed(rows)
    x, residual = torch.randn(rows, 40).to(dtype), torch.randn(rows, 40).to(dtype)
    weight = (torch.rand(40) + 0.5).to(dtype)
    out = torch.empty_like(x)
    torch.ops.shardserve.rms_norm(out, x, weight, 1e-6)
    _assert_close(out, _reference_norm(x, weight, 1e-6))

    x2, residual2 = x.clone(), residual.clone()
    torch.ops.shardserve.add_rms_norm(x2, residual2, weight, 1e-6)
    assert torch.equal(residual2, residual + x)  # the sum rounded once, as the reference adds
    _assert_close(x2, _reference_norm(residual + x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [24, 1536])  # 24: a tail shorter than one vector
def test_silu_and_mul(compiled_cpu_ops, dtype, width):
    torch.manual_seed(width)
    gate_up = (4 * torch.randn(7, 2 * width)).to(dtype)
    out = torch.empty(7, width, dtype=dtype)
    torch.ops.shardserve.silu_and_mul(out, gate_up)
    gate, up = gate_up.chunk(2, -1)
    _assert_close(out, F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_on_a_slice_of_qkv(compiled_cpu_ops, dtype):
    """Llama rotates q and k where they lie in the fused qkv projection; v must stay untouched."""
    torch.manual_seed(0)
    T, nq, nkv, hd = 6, 4, 2, 16
    qkv = torch.randn(T, (nq + 2 * nkv) * hd).to(dtype)
    before = qkv.clone()
    angles = torch.arange(T)[:, None] * 0.7 * torch.arange(1, hd // 2 + 1)[None, :]
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(dtype)[:, None, :]
    sin = torch.cat((-angles.sin(), angles.sin()), -1).to(dtype)[:, None, :]
    qk = qkv[:, : (nq + nkv) * hd].view(T, nq + nkv, hd)
    expected = qk * cos + qk.roll(hd // 2, -1) * sin
    assert apply_rope(qk, cos, sin).data_ptr() == qkv.data_ptr()
    _assert_close(qk, expected)
    assert torch.equal(qkv[:, (nq + nkv) * hd :], before[:, (nq + nkv) * hd :])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_module_same_on_both_paths(compiled_cpu_ops, monkeypatch, dtype):
    """RMSNorm.forward and add_forward give the same through the kernels and through plain torch."""
    torch.manual_seed(1)
    norm = RMSNorm(64, 1e-5, dtype)
    norm.weight.data.copy_(torch.rand(64) + 0.5)
    x, residual = torch.randn(9, 64).to(dtype), torch.randn(9, 64).to(dtype)

    def run():
        return (norm(x), *norm.add_forward(x.clone(), residual.clone()))

    compiled = run()
    monkeypatch.setattr(cpu_kernels, "_loaded", False)  # as where the kernels cannot be built
    for compiled_result, torch_result in zip(compiled, run()):
        _assert_close(compiled_result, torch_result)


def test_fused_ops_refuse_bad_input(compiled_cpu_ops):
    ops = torch.ops.shardserve
    x, w = torch.randn(3, 8), torch.ones(8)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.rms_norm(x.half(), x.half(), w.half(), 1e-6)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous \(8\) tensor"):
        ops.rms_norm(torch.empty_like(x), x, torch.ones(4), 1e-6)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        ops.add_rms_norm(x.t(), x.t().clone(), torch.ones(3), 1e-6)
    with pytest.raises(RuntimeError, match=r"x must be \(rows, 8\)"):
        ops.silu_and_mul(torch.empty(3, 4), torch.randn(3, 7))
    with pytest.raises(RuntimeError, match="head_dim must be even"):
        ops.rotary(torch.randn(3, 2, 5), torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="cos and sin must be contiguous"):
        ops.rotary(torch.randn(3, 2, 4), torch.randn(2, 4), torch.randn(2, 4))
    ops.rms_norm(torch.empty_like(x), x, w, 1e-6)  # and a call in range works
