"""The compiled GEMV (model/csrc/gemv.cpp) against torch's matmul, and the linear layers that use it."""

from __future__ import annotations

import pytest
import torch

from model import ops
from model.layers import ColumnParallelLinear, OneDNNPackedLinear, SingleGroup, onednn_packing_available

# float32: the sums run in another order than torch's (a few ulps). bfloat16: the weights and
# activations are exact in float32, the sum too up to order, and the output is rounded once, so
# results differ by at most one bfloat16 step where a float32 sum lands near a rounding boundary.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=2**-7)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("k", [576, 40, 7])  # 40 and 7: a tail shorter than one vector
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_equals_torch_matmul(compiled_cpu_ops, dtype, rows, k, with_bias):
    torch.manual_seed(rows * 100 + k)
    x, w = torch.randn(rows, k).to(dtype), torch.randn(37, k).to(dtype)  # 37 rows: split unevenly over threads
    bias = torch.randn(37).to(dtype) if with_bias else None
    out = torch.empty(rows, 37, dtype=dtype)
    torch.ops.shardserve.gemv(out, x, w, bias)
    expected = x.float() @ w.float().t() + (bias.float() if with_bias else 0)
    torch.testing.assert_close(out, expected.to(dtype), **TOLERANCE[dtype])


def test_gemv_refuses_what_it_does_not_take(compiled_cpu_ops):
    gemv = torch.ops.shardserve.gemv
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="1 <= M <= 4"):
        gemv(torch.empty(5, 4), torch.randn(5, 8), w, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        gemv(torch.empty(1, 4).half(), x.half(), w.half(), None)
    with pytest.raises(RuntimeError, match="contiguous"):
        gemv(torch.empty(1, 4), x, torch.randn(8, 4).t(), None)
    with pytest.raises(RuntimeError, match=r"x must be \(M, 8\)"):
        gemv(torch.empty(1, 4), torch.randn(1, 7), w, None)
    gemv(torch.empty(1, 4), x, w, None)  # and a call in range works


@pytest.mark.skipif(not onednn_packing_available("cpu", torch.float32), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_runs_small_steps_in_the_gemv_and_larger_ones_in_onednn(compiled_cpu_ops, monkeypatch, dtype):
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 48, True, SingleGroup(), dtype)
    layer.weight.data.copy_(torch.randn(48, 64))
    layer.bias.data.copy_(torch.randn(48))
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.pack_weight(keep_for_decode=True)
    assert isinstance(layer.method, OneDNNPackedLinear) and layer.method.decode_weight is not None
    calls = []
    real = ops.gemv
    monkeypatch.setattr(ops, "gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for rows in (1, 2, 3, 9, 0):  # 0: a prefill chunk that samples nothing reaches the LM head with no rows
        x = torch.randn(rows, 64).to(dtype)
        torch.testing.assert_close(layer(x), (x.float() @ weight.float().t() + bias.float()).to(dtype), **TOLERANCE[dtype])
    assert calls == [1, 2]  # 1 up to ops.GEMV_MAX_ROWS rows
    plain = ColumnParallelLinear(64, 48, False, SingleGroup(), dtype)
    plain.pack_weight()  # cpu_decode_kernel off: one copy of the weights, oneDNN for every step
    assert plain.method.decode_weight is None and not hasattr(plain, "weight")
