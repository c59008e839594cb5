"""Paged attention against plain dense attention, through both decode paths: the compiled CPU kernel
(model/csrc) and the plain torch one it falls back to."""

from __future__ import annotations

import random

import pytest
import torch

from model import cpu_kernels, ops
from model.attention import MAX_DECODE_GROUPS, MIN_DECODE_GROUP, AttentionMetadata, allocate_kv_cache, paged_attention


def _reference_attention(q, k, v, scale):  # q (n, nh, hd), k/v (ctx, nkv, hd); causal, the query is the tail
    n, ctx = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    att = torch.einsum("qhd,khd->hqk", q, k) * scale
    allowed = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
    att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", att, v).reshape(n, -1)


def _paged_vs_dense(seqs, blocks, num_decodes, nh=4, nkv=2, hd=8, bs=4, dtype=torch.float32):
    """Run paged_attention on sequences given as (context before this step, new tokens), with their
    blocks, after caching each prior context; returns (meta, output, dense float32 reference)."""
    cache = allocate_kv_cache((1, 2, 1 + max(max(b) for b in blocks), bs, nkv, hd), dtype, "cpu")[0]
    full_k = [torch.randn(p + n, nkv, hd).to(dtype) for p, n in seqs]
    full_v = [torch.randn(p + n, nkv, hd).to(dtype) for p, n in seqs]
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
    q = torch.randn(sum(n for _, n in seqs), nh, hd).to(dtype)
    k = torch.cat([kk[p:] for (p, _), kk in zip(seqs, full_k)])
    v = torch.cat([vv[p:] for (p, _), vv in zip(seqs, full_v)])
    out = paged_attention(q, k, v, cache, meta, scale=hd ** -0.5)
    start, ref = 0, []
    for (p, n), kk, vv in zip(seqs, full_k, full_v):
        ref.append(_reference_attention(q[start : start + n].float(), kk.float(), vv.float(), hd ** -0.5))
        start += n
    # the new k/v were written at their slots
    torch.testing.assert_close(cache[0].view(-1, nkv, hd)[torch.tensor(slots)], k)
    return meta, out, torch.cat(ref)


def _scattered_blocks(lens, bs, rng):
    free = list(range(1, 4000))
    rng.shuffle(free)
    return [[free.pop() for _ in range(-(-n // bs))] for n in lens]

def test_paged_attention_matches_dense_for_mixed_batch(cpu_ops):
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


def test_paged_attention_groups_decodes_of_different_lengths(torch_cpu_ops):
    """Many decodes of spread-out lengths are attended in several groups; the result is the same."""
    torch.manual_seed(0)
    rng = random.Random(0)
    lens = [rng.randint(0, 40) for _ in range(4 * MIN_DECODE_GROUP)]
    seqs = [(n, 1) for n in lens] + [(3, 2)]  # and a prefill chunk after the decodes
    blocks = _scattered_blocks([p + n for p, n in seqs], 4, rng)
    meta, out, ref = _paged_vs_dense(seqs, blocks, num_decodes=len(lens))
    plans = meta.decode_plans()
    assert len(plans) == MAX_DECODE_GROUPS
    assert sorted(torch.cat([p.rows for p in plans]).tolist()) == list(range(len(lens)))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # decodes of one length stay in one group
    same, _, _ = _paged_vs_dense([(9, 1)] * 32, [[i + 1, i + 100, i + 200] for i in range(32)], num_decodes=32)
    assert len(same.decode_plans()) == 1 and same.decode_plans()[0].rows is None



@pytest.mark.parametrize("nh, nkv, hd", [(9, 3, 64), (4, 4, 16), (8, 2, 128), (6, 2, 24)])
def test_decode_kernel_matches_dense(compiled_cpu_ops, nh, nkv, hd):
    """GQA groups of 3, 1 and 4; head sizes the kernel fixes at compile time (64, 128) and others;
    contexts of one token, exactly one block, one past a block, and long ones, over scattered blocks."""
    torch.manual_seed(0)
    rng = random.Random(0)
    bs = 16
    lens = [1, bs, bs + 1, 2, 300, *[rng.randint(1, 200) for _ in range(11)]]
    seqs = [(n - 1, 1) for n in lens] + [(5, 3)]  # and a prefill chunk after the decodes
    blocks = _scattered_blocks([p + n for p, n in seqs], bs, rng)
    _, out, ref = _paged_vs_dense(seqs, blocks, num_decodes=len(lens), nh=nh, nkv=nkv, hd=hd, bs=bs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_decode_kernel_bfloat16(compiled_cpu_ops):
    """bfloat16 cache and queries, float32 arithmetic inside: within bfloat16 rounding of the exact result."""
    torch.manual_seed(0)
    rng = random.Random(1)
    lens = [rng.randint(1, 120) for _ in range(12)]
    seqs = [(n - 1, 1) for n in lens]
    blocks = _scattered_blocks(lens, 16, rng)
    _, out, ref = _paged_vs_dense(seqs, blocks, num_decodes=len(lens), nh=9, nkv=3, hd=64, bs=16,
                                  dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_decode_kernel_rejects_what_would_read_outside_the_cache(compiled_cpu_ops):
    cache = allocate_kv_cache((1, 2, 4, 4, 2, 8), torch.float32, "cpu")[0]
    q, out = torch.randn(1, 4, 8), torch.empty(1, 4, 8)
    op = torch.ops.shardserve.paged_decode_attention
    lens = torch.tensor([5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="context length 9 is outside 1..8"):
        op(out, q, cache, torch.tensor([[1, 2]]), torch.tensor([9], dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="block id 7 is outside 0..3"):
        op(out, q, cache, torch.tensor([[1, 7]]), lens, 1.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 only"):
        op(out.half(), q.half(), cache.half(), torch.tensor([[1, 2]]), lens, 1.0)
    op(out, q, cache, torch.tensor([[1, 2]]), lens, 1.0)  # and the same call in range works
    assert torch.isfinite(out).all()


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    assert not cpu_kernels.load() and not cpu_kernels.available()
    cache = allocate_kv_cache((1, 2, 4, 4, 2, 8), torch.float32, "cpu")[0]
    assert not ops.decode_kernel(cache)


def test_decode_kernel_takes_q_as_the_models_slice_it(compiled_cpu_ops):
    """Llama hands over q as a column slice of its fused q/k projection (strided rows); any other
    layout is copied first. All give what a packed q gives."""
    torch.manual_seed(0)
    nh, nkv, hd, bs, lens = 4, 2, 16, 4, [3, 9, 1]
    cache = torch.randn(2, 8, bs, nkv, hd)
    tables = torch.tensor([[1, 0, 0], [2, 5, 6], [7, 0, 0]])
    slots = torch.tensor([tables[i, (n - 1) // bs] * bs + (n - 1) % bs for i, n in enumerate(lens)])
    meta = AttentionMetadata(slots, [1, 1, 1], lens, tables, num_decodes=3, block_size=bs)
    k, v = torch.randn(3, nkv, hd), torch.randn(3, nkv, hd)
    qk = torch.randn(3, nh + nkv, hd)
    q_slice = qk[:, :nh]  # rows strided, heads packed
    q_transposed = torch.randn(3, hd, nh).transpose(1, 2)  # heads not packed
    for q in (q_slice, q_transposed):
        expected = paged_attention(q.contiguous(), k, v, cache, meta, 0.25)
        torch.testing.assert_close(paged_attention(q, k, v, cache, meta, 0.25), expected)
