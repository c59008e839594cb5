"""Sharded output equals unsharded transformers, through a real Ray gang and real gloo process groups.

Tolerance: logprobs agree to 2e-4 (absolute, fp32). TP changes the order of
sums (partial row-parallel products are added across ranks) and our paged
attention adds up keys in a different order than transformers' kernel; each
such change moves fp32 results by ~1e-6 relative, and a few layers plus a
log-softmax over the vocabulary keep that far below 1e-4. A wrong shard,
mask or rotary offset moves logprobs by O(0.1-1), so the bound still catches
real errors.
"""

from __future__ import annotations

import pytest

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from tests.reference import close, greedy, hf_greedy, run_all

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
MAX_NEW = 12
LOGPROB_ATOL = 2e-4

# Mixed lengths; the longest spans several KV blocks and, with 16 tokens a step, several prefill chunks.
PROMPTS = [
    [5, 17, 42, 99, 3],
    list(range(10, 47)),
    [7],
    [200 + (i * 37) % 100 for i in range(21)],
]


@pytest.fixture(scope="module")
def references(tiny_llama_dir, tiny_gpt2_dir):
    return {
        "llama": hf_greedy(tiny_llama_dir, PROMPTS, MAX_NEW),
        "gpt2": hf_greedy(tiny_gpt2_dir, PROMPTS, MAX_NEW),
    }


def tiny_engine(model_dir, tp, pp, **kw) -> LLMEngine:
    settings = dict(block_size=4, num_kv_blocks=128, max_num_batched_tokens=16, cpus_per_worker=0.25)
    settings.update(kw)
    config = EngineConfig(model=str(model_dir), tensor_parallel_size=tp, pipeline_parallel_size=pp, **settings)
    return LLMEngine(config)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
def test_greedy_tokens_and_logprobs_match_transformers(ray_cluster, references, request, family, tp, pp):
    engine = tiny_engine(request.getfixturevalue(f"tiny_{family}_dir"), tp, pp)
    try:
        got = run_all(engine, PROMPTS, greedy(MAX_NEW, logprobs=1))
        for want, have in zip(references[family], got):
            assert have.token_ids == want.token_ids
            assert have.finish_reason == "length"
            assert have.logprobs == pytest.approx(want.logprobs, abs=LOGPROB_ATOL)
        assert engine.allocator.num_free == engine.allocator.num_blocks  # nothing leaked
    finally:
        close(engine)
