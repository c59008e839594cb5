"""Prefix caching on a real gang: shared prompt prefixes are not recomputed, and outputs do not change."""

from __future__ import annotations

import pytest

from tests.cluster.test_engine_parity import tiny_engine
from tests.reference import close, greedy, hf_greedy, run_all

PREFIX = [(7 * i + 3) % 300 + 10 for i in range(41)]  # a "system prompt" of 10 full blocks and a bit
FIRST = PREFIX + [11, 23, 5]
SECOND = PREFIX + [87, 140]
STAT_KEYS = ("prefix_cache_query_tokens", "prefix_cache_hit_tokens", "prefill_tokens_computed")
MAX_NEW = 8


@pytest.fixture(scope="module")
def engines(ray_cluster, tiny_llama_dir):
    on = tiny_engine(tiny_llama_dir, 1, 1)
    off = tiny_engine(tiny_llama_dir, 1, 1, enable_prefix_caching=False)
    yield on, off
    close(on)
    close(off)


def run_one(engine, prompt):
    """Run one request alone; return its tokens and how the prefix-cache stats moved."""
    before = engine.stats()
    (out,) = run_all(engine, [prompt], greedy(MAX_NEW))
    after = engine.stats()
    return out.token_ids, {k: getattr(after, k) - getattr(before, k) for k in STAT_KEYS}


def test_second_request_reuses_the_shared_prefix_with_identical_output(engines, tiny_llama_dir):
    on, off = engines
    first, d1 = run_one(on, FIRST)
    second, d2 = run_one(on, SECOND)
    assert d1["prefix_cache_query_tokens"] == len(FIRST)
    assert d2["prefix_cache_query_tokens"] == len(SECOND)
    assert d2["prefix_cache_hit_tokens"] == 40  # the prefix's 10 full blocks of 4
    assert d2["prefill_tokens_computed"] == len(SECOND) - 40 < d1["prefill_tokens_computed"]
    assert on.allocator.num_free == on.allocator.num_blocks
    assert on.stats().kv_blocks_cached > 0  # kept for later prompts, yet counted as free

    want = run_all(off, [FIRST, SECOND], greedy(MAX_NEW))
    assert [first, second] == [w.token_ids for w in want]
    assert [first, second] == [r.token_ids for r in hf_greedy(tiny_llama_dir, [FIRST, SECOND], MAX_NEW)]
    assert off.stats().prefix_cache_hit_tokens == 0


def test_repeated_and_concurrent_prompts_match_caching_off(engines):
    on, off = engines
    # The whole of FIRST is cached now: only its last token is computed. The others arrive together,
    # so some compute the same blocks side by side before any is registered.
    prompts = [FIRST, PREFIX + [1, 2, 3, 4, 5, 6, 7], PREFIX + [1, 2, 3, 4, 5, 6, 8], PREFIX[:20] + [9] * 10,
               list(PREFIX)]
    before = on.stats().prefix_cache_hit_tokens
    got = run_all(on, prompts, greedy(MAX_NEW))
    want = run_all(off, prompts, greedy(MAX_NEW))
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert on.stats().prefix_cache_hit_tokens - before >= len(FIRST) - 1
    assert on.allocator.num_free == on.allocator.num_blocks
