"""The real default model (SmolLM2-135M-Instruct) sharded over gangs matches transformers.

9 heads and 3 KV heads allow tp in {1, 3}; 30 layers split over 2 stages.
Same logprob tolerance and reasoning as tests/cluster/test_engine_parity.py; 30
layers instead of 2 leave the fp32 drift still under 1e-4 in practice.
"""

from __future__ import annotations

import pytest

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from model.tokenizer import encode_prompt, load_tokenizer
from tests.reference import close, greedy, hf_greedy, run_all

MAX_NEW = 16
QUESTIONS = ["What is the capital of France?", "Name three colors."]
LOGPROB_ATOL = 2e-4


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    return [encode_prompt(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(smollm2_dir, prompts):
    return hf_greedy(smollm2_dir, prompts, MAX_NEW)


@pytest.mark.parametrize("tp,pp", [(3, 1), (1, 2)], ids=["tp3-pp1", "tp1-pp2"])
def test_smollm2_sharded_matches_transformers(ray_cluster, smollm2_dir, prompts, reference, tp, pp):
    engine = LLMEngine(
        EngineConfig(
            model=str(smollm2_dir),
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            num_kv_blocks=64,
            cpus_per_worker=0.5,
        )
    )
    try:
        got = run_all(engine, prompts, greedy(MAX_NEW, logprobs=1))
        for want, have in zip(reference, got):
            assert have.token_ids == want.token_ids
            assert have.logprobs == pytest.approx(want.logprobs, abs=LOGPROB_ATOL)
        assert "Paris" in got[0].text
    finally:
        close(engine)
