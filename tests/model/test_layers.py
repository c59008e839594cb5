"""Tensor-parallel layers, with ranks simulated in one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.layers import (ColumnParallelLinear, MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                          OneDNNPackedLinear, RowParallelLinear, SingleGroup, VocabParallelEmbedding, divide,
                          onednn_packing_available)


class SimRank:
    """One rank of a simulated group: collectives return the local part, the test combines the ranks."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def all_reduce(self, x):
        return x

    def all_gather(self, x, dim=-1):
        return x


class Source:
    """A checkpoint tensor as the loader presents it (see model/loader.TensorSource)."""

    def __init__(self, tensor, key="w"):
        self.tensor, self.key, self.shape = tensor, key, tuple(tensor.shape)

    def read(self, dim=None, start=0, length=None):
        return self.tensor if dim is None else self.tensor.narrow(dim, start, length)


def _load(layer, **tensors):
    """Fill every parameter of `layer` from named full tensors (shard ids given as name:shard)."""
    for pname, param in layer.named_parameters():
        filled = 0
        for key, t in tensors.items():
            base, _, shard = key.partition(":")
            if base == pname:
                shard_id = int(shard) if shard.isdigit() else (shard or None)
                filled += param.weight_loader(param, Source(t, key), shard_id)
        assert filled == param.numel(), pname


def test_divide_names_numbers():
    assert divide(12, 4) == 3
    with pytest.raises(ValueError, match="10 is not divisible by 4"):
        divide(10, 4)


def test_single_group_is_identity():
    x = torch.randn(3)
    g = SingleGroup()
    assert g.all_reduce(x) is x and g.all_gather(x) is x and (g.rank, g.size) == (0, 1)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_and_row_parallel_compose_to_full_mlp(tp):
    torch.manual_seed(0)
    w1, b1, w2, b2 = torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)
    x = torch.randn(5, 8)
    total = 0
    for r in range(tp):
        col = ColumnParallelLinear(8, 16, True, SimRank(r, tp), torch.float32)
        row = RowParallelLinear(16, 8, True, SimRank(r, tp), torch.float32)
        _load(col, weight=w1, bias=b1)
        _load(row, weight=w2, **({"bias": b2} if r == 0 else {}))
        assert (row.bias is not None) == (r == 0)  # the bias is added once, by rank 0
        total = total + row(col(x))
    torch.testing.assert_close(total, F.linear(F.linear(x, w1, b1), w2, b2))


@pytest.mark.parametrize("tp,kv_heads", [(1, 2), (2, 2), (4, 2), (2, 1), (4, 4)])
def test_qkv_parallel_heads_and_kv_layout(tp, kv_heads):
    torch.manual_seed(0)
    nh, hd, hidden = 4, 3, 8
    wq, wk, wv = torch.randn(nh * hd, hidden), torch.randn(kv_heads * hd, hidden), torch.randn(kv_heads * hd, hidden)
    bq, bk, bv = torch.randn(nh * hd), torch.randn(kv_heads * hd), torch.randn(kv_heads * hd)
    x = torch.randn(2, hidden)
    q_full = F.linear(x, wq, bq).view(2, nh, hd)
    k_full = F.linear(x, wk, bk).view(2, kv_heads, hd)
    group = nh // kv_heads
    for r in range(tp):
        layer = QKVParallelLinear(hidden, hd, nh, kv_heads, True, SimRank(r, tp), torch.float32)
        _load(layer, **{"weight:q": wq, "weight:k": wk, "weight:v": wv, "bias:q": bq, "bias:k": bk, "bias:v": bv})
        q, k, _ = layer(x).split([layer.q_size_per_partition, layer.kv_size_per_partition,
                                  layer.kv_size_per_partition], -1)
        q = q.view(2, -1, hd)
        k = k.view(2, -1, hd)
        heads = range(r * nh // tp, (r + 1) * nh // tp)
        torch.testing.assert_close(q, q_full[:, list(heads)])
        # every local query head's KV head (in the full model) is present locally at the GQA position
        local_group = layer.num_heads_per_partition // layer.num_kv_heads_per_partition
        for j, h in enumerate(heads):
            torch.testing.assert_close(k[:, j // local_group], k_full[:, h // group])


def test_qkv_parallel_refuses_unsplittable_kv_heads():
    with pytest.raises(ValueError, match="tensor parallel size 2 .* num_kv_heads 3"):
        QKVParallelLinear(12, 2, 6, 3, False, SimRank(0, 2), torch.float32)


def test_merged_gate_up_parallel():
    torch.manual_seed(0)
    wg, wu, x = torch.randn(6, 4), torch.randn(6, 4), torch.randn(3, 4)
    parts = []
    for r in range(2):
        layer = MergedColumnParallelLinear(4, [6, 6], False, SimRank(r, 2), torch.float32)
        _load(layer, **{"weight:0": wg, "weight:1": wu})
        parts.append(layer(x).chunk(2, -1))
    torch.testing.assert_close(torch.cat([g for g, _ in parts], -1), F.linear(x, wg))
    torch.testing.assert_close(torch.cat([u for _, u in parts], -1), F.linear(x, wu))


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_vocab_parallel_embedding_and_lm_head_with_padding(tp):
    torch.manual_seed(0)
    vocab, hidden = 10, 4  # 10 is not a multiple of 3: the last rank gets zero padding rows
    table = torch.randn(vocab, hidden)
    ids = torch.tensor([0, 3, 9, 5, 9])
    h = torch.randn(2, hidden)
    emb_sum, logit_parts = 0, []
    for r in range(tp):
        emb = VocabParallelEmbedding(vocab, hidden, SimRank(r, tp), torch.float32)
        head = ParallelLMHead(vocab, hidden, SimRank(r, tp), torch.float32)
        _load(emb, weight=table)
        _load(head, weight=table)
        emb_sum = emb_sum + emb(ids)
        logit_parts.append(F.linear(h, head.weight))
        assert emb.vocab_size_padded % tp == 0 and emb.vocab_size_padded - vocab < tp
    torch.testing.assert_close(emb_sum, table[ids])
    torch.testing.assert_close(torch.cat(logit_parts, -1)[:, :vocab], h @ table.T)
    single = ParallelLMHead(vocab, hidden, SingleGroup(), torch.float32)
    _load(single, weight=table)
    out = single(h.to(torch.float32))
    assert out.shape == (2, vocab) and out.dtype == torch.float32


@pytest.mark.skipif(not onednn_packing_available("cpu", torch.float32), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, {}), (torch.bfloat16, {"atol": 2e-2, "rtol": 2e-2})])
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_packed_weights_compute_what_the_loaded_ones_do(dtype, tol, rows):
    torch.manual_seed(0)
    w, b = torch.randn(24, 16, dtype=dtype), torch.randn(24, dtype=dtype)
    x = torch.randn(16, rows, dtype=dtype).t()  # a strided input, as attention's output can be
    col = ColumnParallelLinear(16, 24, True, SingleGroup(), dtype)
    row = RowParallelLinear(24, 16, False, SingleGroup(), dtype)
    _load(col, weight=w, bias=b)
    _load(row, weight=w.t().contiguous())
    expected = row(col(x))
    col.pack_weight()
    row.pack_weight()
    assert isinstance(col.method, OneDNNPackedLinear) and not hasattr(col, "weight")  # one copy of the weights
    torch.testing.assert_close(row(col(x)), expected, **tol)


@pytest.mark.skipif(not onednn_packing_available("cpu", torch.float32), reason="this torch build has no oneDNN")
def test_packed_tied_lm_head_leaves_the_embedding_its_table():
    torch.manual_seed(0)
    table, ids, h = torch.randn(40, 8), torch.tensor([0, 39, 7]), torch.randn(3, 8)
    emb = VocabParallelEmbedding(40, 8, SingleGroup(), torch.float32)
    head = ParallelLMHead(40, 8, SingleGroup(), torch.float32)
    _load(emb, weight=table)
    head.weight = emb.weight  # tied, as the model builds it
    head.pack_weight(keep_original=True)
    torch.testing.assert_close(emb(ids), table[ids])
    torch.testing.assert_close(head(h), h @ table.T)


def test_loader_rejects_wrong_shape():
    layer = ColumnParallelLinear(8, 16, False, SingleGroup(), torch.float32)
    with pytest.raises(ValueError, match=r"shape \(16, 7\), expected \(16, 8\)"):
        layer.weight.weight_loader(layer.weight, Source(torch.zeros(16, 7)), None)


def test_step_rows_are_few_size_classes_with_at_most_an_eighth_of_padding():
    from model.layers import step_rows

    assert [step_rows(r) for r in range(1, 17)] == list(range(1, 17))
    classes = {step_rows(r) for r in range(1, 513)}
    assert len(classes) == 56 and max(classes) == 512
    for rows in range(17, 2049):
        assert rows <= step_rows(rows) <= rows * 9 / 8
        assert step_rows(step_rows(rows)) == step_rows(rows)
