"""Penalties, logit_bias and min_tokens through a whole engine (one in-process worker, no Ray): greedy
tokens equal transformers' generate with the same settings (repetition_penalty, sequence_bias,
min_new_tokens; presence / frequency through a reference LogitsProcessor, transformers having none),
logprobs equal log-softmax of transformers' processed scores (2e-4, as in test_engine_parity.py), and
requests without them run exactly as before."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from cluster.protocol import InvalidRequestError
from model.sampling_params import SamplingParams
from tests.cluster.test_engine_parity import LOGPROB_ATOL, PROMPTS, tiny_engine
from tests.reference import close, collect, hf_greedy, run_all

MAX_NEW = 12


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    eng = tiny_engine(tiny_llama_dir, 1, 1, worker_process="in_process")
    steps = []
    execute = eng.gang.execute

    async def recording(step):  # every StepInput, for the tests that look at what a step carries
        steps.append(step)
        return await execute(step)

    eng.gang.execute = recording
    eng.recorded_steps = steps
    yield eng
    close(eng)


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.eval()
    return model


class PresenceFrequency(LogitsProcessor):
    """The OpenAI formula, written out plainly over the generated tokens only."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        output = input_ids[0, self.prompt_len :].tolist()
        for t in set(output):
            scores[0, t] -= self.presence + self.frequency * output.count(t)
        return scores


def hf_generate(model, prompt, max_new, eos=None, processors=(), **kwargs):
    """Greedy generate; (new tokens, logprobs from the processed scores)."""
    model.generation_config.eos_token_id = eos
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0, logits_processor=LogitsProcessorList(processors), **kwargs)  # fmt: skip
    new = out.sequences[0, len(prompt) :].tolist()
    return new, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]


def greedy(max_tokens=MAX_NEW, **kw) -> SamplingParams:
    kw.setdefault("ignore_eos", True)
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=1, **kw)


def assert_same(got, want):
    tokens, logprobs = want
    assert got.token_ids == tokens
    assert got.logprobs == pytest.approx(logprobs, abs=LOGPROB_ATOL)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(engine, hf_model, penalty):
    got = run_all(engine, PROMPTS, greedy(repetition_penalty=penalty))
    for prompt, g in zip(PROMPTS, got):
        assert_same(g, hf_generate(hf_model, prompt, MAX_NEW, repetition_penalty=penalty))


def test_logit_bias_matches_transformers(engine, hf_model):
    plain = run_all(engine, PROMPTS, greedy())
    # Ban each prompt's first greedy token, favour a few others: the outputs change.
    for prompt, p in zip(PROMPTS, plain):
        bias = {str(p.token_ids[0]): -100.0, "42": 2.5, "300": 4.0, "7": -3.0}
        got = run_all(engine, [prompt], greedy(logit_bias=bias))[0]
        assert got.token_ids != p.token_ids
        want = hf_generate(hf_model, prompt, MAX_NEW, sequence_bias=[[[int(t)], b] for t, b in bias.items()])
        assert_same(got, want)


def test_min_tokens_holds_back_every_eos_the_scheduler_knows(engine, hf_model):
    """Each id the scheduler stops at is favoured by +50: the request still runs min_tokens, then stops."""
    eos = sorted(engine.scheduler.eos_token_ids)
    assert len(eos) == 2  # the config's and the tokenizer's: both must be held back
    bias = {str(t): 50.0 for t in eos}
    for prompt in PROMPTS:
        got = run_all(engine, [prompt], greedy(min_tokens=5, logit_bias=bias, ignore_eos=False))[0]
        assert len(got.token_ids) == 6 and got.token_ids[-1] in eos and got.finish_reason == "stop"
        assert not set(got.token_ids[:5]) & set(eos)
        want = hf_generate(hf_model, prompt, MAX_NEW, eos=eos, min_new_tokens=5,
                           sequence_bias=[[[t], 50.0] for t in eos])  # fmt: skip
        assert_same(got, want)


def test_min_tokens_holds_back_stop_token_ids(engine, hf_model):
    prompt = PROMPTS[0]
    got = run_all(engine, [prompt], greedy(min_tokens=3, stop_token_ids=[99], logit_bias={"99": 30.0}))[0]
    assert got.token_ids[3] == 99 and len(got.token_ids) == 4 and got.finish_reason == "stop"
    assert_same(got, hf_generate(hf_model, prompt, MAX_NEW, eos=[99], min_new_tokens=3, sequence_bias=[[[99], 30.0]]))


def test_all_together_in_vllms_order_match_transformers(engine, hf_model):
    """Bias before repetition penalty (transformers' order too), min_tokens first: one request with all three."""
    eos = sorted(engine.scheduler.eos_token_ids)
    bias = {str(eos[0]): 20.0, "42": 1.5, "5": 3.0}
    got = run_all(engine, PROMPTS, greedy(min_tokens=4, logit_bias=bias, repetition_penalty=1.25, ignore_eos=False))
    for prompt, g in zip(PROMPTS, got):
        want = hf_generate(hf_model, prompt, MAX_NEW, eos=eos, min_new_tokens=4, repetition_penalty=1.25,
                           sequence_bias=[[[int(t)], b] for t, b in bias.items()])  # fmt: skip
        assert_same(g, want)


@pytest.mark.parametrize("presence, frequency", [(0.8, 0.0), (0.0, 0.6), (-0.5, 0.4), (1.0, -0.3)])
def test_presence_and_frequency_match_the_formula(engine, hf_model, presence, frequency):
    got = run_all(engine, PROMPTS, greedy(presence_penalty=presence, frequency_penalty=frequency))
    for prompt, g in zip(PROMPTS, got):
        ref = PresenceFrequency(len(prompt), presence, frequency)
        assert_same(g, hf_generate(hf_model, prompt, MAX_NEW, processors=[ref]))


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_a_large_penalty_never_repeats_an_output_token(engine, field):
    plain = run_all(engine, PROMPTS, greedy(24))
    assert any(len(set(p.token_ids)) < 24 for p in plain)  # without it, greedy output repeats itself
    for g in run_all(engine, PROMPTS, greedy(24, **{field: 2.0})):
        assert len(set(g.token_ids)) == 24
    # And the other way: a negative one makes repeats more common.
    repeats = lambda outs: sum(24 - len(set(o.token_ids)) for o in outs)  # noqa: E731
    assert repeats(run_all(engine, PROMPTS, greedy(24, **{field: -2.0}))) > repeats(plain)


def test_requests_without_them_are_unchanged_and_carry_nothing(engine, tiny_llama_dir):
    want = hf_greedy(tiny_llama_dir, PROMPTS, MAX_NEW)
    engine.recorded_steps.clear()
    alone = run_all(engine, PROMPTS, greedy())
    assert [a.token_ids for a in alone] == [w.token_ids for w in want]
    assert all(not s.penalty_ids and not s.banned_ids for s in engine.recorded_steps)

    async def mixed():
        # Plain requests share every batch with penalised ones.
        plain = [collect(engine, p, greedy()) for p in PROMPTS]
        other = [collect(engine, p, greedy(repetition_penalty=1.5, presence_penalty=1.0, min_tokens=6,
                                           logit_bias={"3": 5.0}, ignore_eos=False)) for p in PROMPTS]  # fmt: skip
        return await asyncio.gather(*plain, *other)

    engine.recorded_steps.clear()
    results = asyncio.run(mixed())
    assert [r.token_ids for r in results[: len(PROMPTS)]] == [w.token_ids for w in want]
    # Logprobs to the parity tolerance: a different batch is a different matmul shape, and its float
    # rounding may move the last digits (the tokens stay exact).
    for r, a in zip(results[: len(PROMPTS)], alone):
        assert r.logprobs == pytest.approx(a.logprobs, abs=LOGPROB_ATOL)
    for step in engine.recorded_steps:  # only the penalised rows carry token ids and bans
        for rows in (step.penalty_ids, step.banned_ids):
            assert all(step.sampling[r].penalizes or step.sampling[r].min_tokens for r in rows)
        for r, (prompt_ids, output_ids) in step.penalty_ids.items():
            assert prompt_ids in PROMPTS and len(output_ids) == step.steps[r]
    assert any(step.penalty_ids for step in engine.recorded_steps)
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_logit_bias_outside_the_vocabulary_is_refused(engine):
    async def main():
        return await collect(engine, [5, 6], greedy(logit_bias={"5": 1.0, "512": 1.0}))

    with pytest.raises(InvalidRequestError, match="logit_bias token id 512 is outside the vocabulary"):
        asyncio.run(main())
