"""Tensor-parallel layers (ranks simulated in one process) and paged attention against plain attention."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from model.attention import (MAX_DECODE_GROUPS, MIN_DECODE_GROUP, AttentionMetadata, allocate_kv_cache,
                             paged_attention)
from model.layers import (ColumnParallelLinear, MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                          RowParallelLinear, SingleGroup, VocabParallelEmbedding, divide, onednn_packing_available)


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
    assert col.packed is not None and not hasattr(col, "weight")  # one copy of the weights
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


# ---- paged attention ----

def _reference_attention(q, k, v, scale):  # q (n, nh, hd), k/v (ctx, nkv, hd); causal, the query is the tail
    n, ctx = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    att = torch.einsum("qhd,khd->hqk", q, k) * scale
    allowed = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
    att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", att, v).reshape(n, -1)


def _paged_vs_dense(seqs, blocks, num_decodes, nh=4, nkv=2, hd=8, bs=4):
    """Run paged_attention on sequences given as (context before this step, new tokens), with their
    blocks, after caching each prior context; returns (meta, output, dense reference)."""
    cache = allocate_kv_cache(1, 1 + max(max(b) for b in blocks), bs, nkv, hd, torch.float32, "cpu")[0]
    full_k = [torch.randn(p + n, nkv, hd) for p, n in seqs]
    full_v = [torch.randn(p + n, nkv, hd) for p, n in seqs]
    for (prior, _), b, kk, vv in zip(seqs, blocks, full_k, full_v):  # the prior context is already cached
        for pos in range(prior):
            cache[0, b[pos // bs], pos % bs] = kk[pos]
            cache[1, b[pos // bs], pos % bs] = vv[pos]
    slots = [b[pos // bs] * bs + pos % bs for (p, n), b in zip(seqs, blocks) for pos in range(p, p + n)]
    width = max(map(len, blocks))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_lens=[n for _, n in seqs], context_lens=[p + n for p, n in seqs],
        block_tables=torch.tensor([b + [0] * (width - len(b)) for b in blocks]), num_decodes=num_decodes,
        block_size=bs)
    q = torch.randn(sum(n for _, n in seqs), nh, hd)
    k = torch.cat([kk[p:] for (p, _), kk in zip(seqs, full_k)])
    v = torch.cat([vv[p:] for (p, _), vv in zip(seqs, full_v)])
    out = paged_attention(q, k, v, cache, meta, scale=hd ** -0.5)
    start, ref = 0, []
    for (p, n), kk, vv in zip(seqs, full_k, full_v):
        ref.append(_reference_attention(q[start : start + n], kk, vv, hd ** -0.5))
        start += n
    # the new k/v were written at their slots
    torch.testing.assert_close(cache[0].view(-1, nkv, hd)[torch.tensor(slots)], k)
    return meta, out, torch.cat(ref)


def test_paged_attention_matches_dense_for_mixed_batch():
    """Three decodes of different lengths, a prefill chunk that continues cached context, and a fresh
    prefill, with scattered (non-contiguous) blocks."""
    torch.manual_seed(0)
    seqs = [(6, 1), (1, 1), (9, 1), (5, 3), (0, 6)]  # decodes first
    blocks = [[7, 2], [30], [4, 11, 20], [9, 15], [1, 25]]
    meta, out, ref = _paged_vs_dense(seqs, blocks, num_decodes=3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the per-step plan is computed once and reused by every layer
    assert meta.decode_plans() is meta.decode_plans()
    assert meta.prefill_plans() is meta.prefill_plans()


def test_paged_attention_groups_decodes_of_different_lengths():
    """Many decodes of spread-out lengths are attended in several groups; the result is the same."""
    torch.manual_seed(0)
    rng = random.Random(0)
    lens = [rng.randint(0, 40) for _ in range(4 * MIN_DECODE_GROUP)]
    seqs = [(n, 1) for n in lens] + [(3, 2)]  # and a prefill chunk after the decodes
    free = list(range(1, 1000))
    rng.shuffle(free)
    blocks = [[free.pop() for _ in range(-(-(p + n) // 4))] for p, n in seqs]
    meta, out, ref = _paged_vs_dense(seqs, blocks, num_decodes=len(lens))
    plans = meta.decode_plans()
    assert len(plans) == MAX_DECODE_GROUPS
    assert sorted(torch.cat([p.rows for p in plans]).tolist()) == list(range(len(lens)))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # decodes of one length stay in one group
    same, _, _ = _paged_vs_dense([(9, 1)] * 32, [[i + 1, i + 100, i + 200] for i in range(32)], num_decodes=32)
    assert len(same.decode_plans()) == 1 and same.decode_plans()[0].rows is None
