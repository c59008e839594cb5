"""Logits processing before sampling (model/sampling.py apply_logits_processing): min_tokens bans,
logit_bias, repetition / frequency / presence penalties. The math against a plain per-token formula and
against transformers' own processors; validation of the new SamplingParams fields; the request-side
checks (vocabulary, context) and stop strings waiting for min_tokens (cluster/processing.py)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from cluster.processing import InputProcessor, OutputStream
from cluster.protocol import GenerateRequest, InvalidRequestError
from deployments.openai_protocol import CompletionRequest, _sampling, validate
from deployments.protocol import RequestError
from model.sampling import apply_logits_processing, apply_token_masks, sample
from model.sampling_params import SamplingParams
from model.tokenizer import load_tokenizer
from tests.tiny_tokenizer import save_tiny_tokenizer

VOCAB = 1000


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0


def random_ids(rng: random.Random, n: int, vocab: int = VOCAB) -> list[int]:
    # A small id range, so that tokens repeat and counts above 1 occur.
    return [rng.randrange(min(vocab, 40)) for _ in range(n)]


def reference(row: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int], banned: list[int]) -> torch.Tensor:
    """The plain formula for one row, token by token, in vLLM's order."""
    row = row.clone()
    for t in banned:
        row[t] = -math.inf
    for t, b in p.logit_bias:
        row[t] += b
    for t in set(prompt) | set(output):
        row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        count = output.count(t)
        row[t] -= p.frequency_penalty * count + p.presence_penalty
    return row


def run(logits, params, token_ids=None, banned=None):
    out = logits.clone()
    apply_logits_processing(out, params, token_ids or {}, banned or {})
    return out


# ---- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": -2.01}, "frequency_penalty must be in [-2, 2], got -2.01"),
        ({"presence_penalty": float("nan")}, "presence_penalty must be a finite number"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0, got 0.0"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number"),
        ({"min_tokens": -1}, "min_tokens must be >= 0, got -1"),
        ({"min_tokens": 1.5}, "min_tokens must be an integer, got 1.5"),
        ({"min_tokens": 17}, "min_tokens (17) must be <= max_tokens (16)"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias['5'] must be in [-100, 100], got 100.5"),
        ({"logit_bias": {"5": "1"}}, "logit_bias['5'] must be a finite number, got '1'"),
        ({"logit_bias": {"five": 1}}, "logit_bias keys must be token ids, got 'five'"),
        ({"logit_bias": {" 5": 1}}, "logit_bias keys must be token ids, got ' 5'"),
        ({"logit_bias": {"-5": 1}}, "logit_bias keys must be token ids, got '-5'"),
        ({"logit_bias": {-5: 1}}, "logit_bias key -5 must be >= 0, got -5"),
        ({"logit_bias": {"7": 1, "07": 2}}, "logit_bias names token 7 twice"),
        ({"logit_bias": [5]}, "logit_bias must map token ids to biases, got 5"),
        ({"logit_bias": 5}, "logit_bias must map token ids to biases, got 5"),
    ],
)
def test_invalid_params_name_field_and_value(kwargs, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert message in str(err.value)


def test_logit_bias_is_stored_as_sorted_pairs_and_params_stay_hashable():
    a = SamplingParams(logit_bias={"9": 1, "3": -2.5})
    b = SamplingParams(logit_bias=[(3, -2.5), (9, 1.0)])
    assert a.logit_bias == ((3, -2.5), (9, 1.0)) and a == b and hash(a) == hash(b)
    assert SamplingParams(max_tokens=None, min_tokens=500).min_tokens == 500  # the engine fills max_tokens in


def test_penalizes_only_when_a_penalty_is_on():
    assert not SamplingParams().penalizes
    assert not SamplingParams(logit_bias={"1": 5}, min_tokens=3).penalizes  # these need no token ids
    for kw in ({"presence_penalty": 0.1}, {"frequency_penalty": -0.1}, {"repetition_penalty": 1.1}):
        assert SamplingParams(**kw).penalizes


def test_openai_fields_map_to_params_and_bad_values_are_400s():
    req = validate({"model": "m", "prompt": "x", "presence_penalty": 0.5, "frequency_penalty": None,
                    "logit_bias": {"12": -100, "3": 2}, "repetition_penalty": 1.2, "min_tokens": 2},
                   CompletionRequest)  # fmt: skip
    p = _sampling(req, 16, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_tokens) == (0.5, 0.0, 1.2, 2)
    assert p.logit_bias == ((3, 2.0), (12, -100.0))
    defaults = _sampling(validate({"model": "m", "prompt": "x"}, CompletionRequest), 16, None)
    assert not defaults.penalizes and defaults.logit_bias == () and defaults.min_tokens == 0
    with pytest.raises(RequestError) as err:
        validate({"model": "m", "prompt": "x", "presence_penalty": 3}, CompletionRequest)
    assert err.value.status == 400 and err.value.param == "presence_penalty"
    for body in ({"logit_bias": {"x": 1}}, {"logit_bias": {"1": 101}}, {"min_tokens": 20}):
        with pytest.raises(RequestError) as err:
            _sampling(validate({"model": "m", "prompt": "x", **body}, CompletionRequest), 16, None)
        assert err.value.status == 400


# ---- the math ---------------------------------------------------------------------------------------


def test_each_row_matches_the_plain_formula():
    rng = random.Random(0)
    settings = [
        SamplingParams(),
        SamplingParams(presence_penalty=1.5),
        SamplingParams(frequency_penalty=0.7),
        SamplingParams(presence_penalty=-0.5, frequency_penalty=-1.25),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.6),
        SamplingParams(logit_bias={"3": 4.0, "999": -100, "17": 0.25}),
        SamplingParams(logit_bias={"5": 2.0}, repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.2, min_tokens=4),
        SamplingParams(min_tokens=3, stop_token_ids=(7,)),
    ]
    logits = random_logits(len(settings))
    token_ids, banned, want = {}, {}, []
    for i, p in enumerate(settings):
        prompt, output = random_ids(rng, 30), random_ids(rng, 25)
        if p.penalizes:
            token_ids[i] = (prompt if p.repetition_penalty != 1 else [], output)
        ban = [2, 7, 0] if p.min_tokens else []
        if ban:
            banned[i] = ban
        want.append(reference(logits[i], p, prompt if p.repetition_penalty != 1 else [], output if p.penalizes else [], ban))
    got = run(logits, settings, token_ids, banned)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-6, atol=1e-6)
    assert torch.equal(got[0], logits[0])  # a row that asks nothing is untouched, bit for bit


def test_rows_asking_nothing_are_untouched_and_cost_nothing():
    logits = random_logits(4)
    out = logits.clone()
    apply_logits_processing(out, [SamplingParams()] * 4, {}, {})
    assert torch.equal(out, logits)


def test_a_rows_result_does_not_depend_on_its_batch():
    rng = random.Random(1)
    params = [SamplingParams(repetition_penalty=1.2 + 0.1 * i, presence_penalty=0.4 * i, logit_bias={str(i): 1.0})
              for i in range(5)]  # fmt: skip
    ids = {i: (random_ids(rng, 20), random_ids(rng, 10 * i)) for i in range(5)}
    logits = random_logits(5, seed=3)
    together = run(logits, params, ids)
    for i in range(5):
        alone = run(logits[i : i + 1], [params[i]], {0: ids[i]})
        assert torch.equal(alone[0], together[i])


def test_matches_transformers_processors_in_the_same_order():
    """transformers applies sequence_bias, then repetition_penalty, then min_new_tokens: vLLM's order."""
    rng = random.Random(2)
    eos = [2, 11]
    cases = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.75),
        SamplingParams(logit_bias={"4": 5.0, "20": -7.5, "2": 3.0}),
        SamplingParams(logit_bias={"4": 5.0, "9": -2.0}, repetition_penalty=1.6, min_tokens=6),
        SamplingParams(min_tokens=6),
    ]
    for case, p in enumerate(cases):
        prompt, output = random_ids(rng, 15), random_ids(rng, case + 2)  # fewer outputs than min_tokens
        input_ids = torch.tensor([prompt + output])
        scores = random_logits(1, seed=10 + case)
        want = scores.clone()
        if p.logit_bias:
            want = SequenceBiasLogitsProcessor([[[t], b] for t, b in p.logit_bias])(input_ids, want)
        if p.repetition_penalty != 1:
            want = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(input_ids, want)
        if p.min_tokens:
            want = MinNewTokensLengthLogitsProcessor(len(prompt), p.min_tokens, eos)(input_ids, want)
        ids = {0: (prompt, output)} if p.penalizes else {}
        banned = {0: eos} if len(output) < p.min_tokens else {}
        torch.testing.assert_close(run(scores, [p], ids, banned), want, rtol=0, atol=0)


def test_masked_tokens_stay_masked_and_nothing_becomes_nan():
    logits = random_logits(1, vocab=64)
    allowed = torch.zeros(64, dtype=torch.bool)
    allowed[:8] = True
    mask = sum(1 << i for i in range(64) if allowed[i]).to_bytes(8, "little")
    apply_token_masks(logits, {0: mask})
    p = SamplingParams(logit_bias={"40": 100, "3": -100}, repetition_penalty=0.5, frequency_penalty=-2, presence_penalty=-2)
    out = run(logits, [p], {0: ([40, 41, 3], [40, 40, 5])}, {0: [1, 999]})  # 999: past the vocabulary, ignored
    assert not out.isnan().any()
    assert out[0, ~allowed].eq(-math.inf).all() and out[0, 1] == -math.inf
    assert out[0, allowed].isfinite().sum() == 7


def test_sampling_sees_the_processed_logits():
    """Greedy follows the bias and penalties; logprobs come from the processed logits (before temperature)."""
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]])
    greedy = SamplingParams(temperature=0, logprobs=1)
    p = SamplingParams(temperature=0, logprobs=1, presence_penalty=1.5, logit_bias={"3": 3.5})
    processed = run(logits, [p], {0: ([], [0])})  # token 0 seen once: 5 - 1.5 = 3.5; token 3 biased to 3.5
    assert processed.tolist() == [[3.5, 4.0, 3.0, 3.5]]
    out = sample(processed, [p], [0], [1])
    assert out.token_ids == [1]
    assert out.logprobs[0] == pytest.approx(torch.log_softmax(processed[0], -1)[1].item())
    assert sample(logits.clone(), [greedy], [0], [1]).token_ids == [0]


# ---- request-side checks and stop strings ------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(save_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tok"), 320))


def test_logit_bias_outside_the_vocabulary_is_refused_naming_the_id(tok):
    proc = InputProcessor(tok, vocab_size=320, max_model_len=64)
    _, params = proc.process(GenerateRequest([5, 6], SamplingParams(logit_bias={"319": 1, "0": -1})))
    assert params.logit_bias == ((0, -1.0), (319, 1.0))
    with pytest.raises(InvalidRequestError, match="logit_bias token id 320 is outside the vocabulary"):
        proc.process(GenerateRequest([5, 6], SamplingParams(logit_bias={"3": 1, "320": 1, "5000": 1})))


def test_min_tokens_over_what_the_context_leaves_is_refused(tok):
    proc = InputProcessor(tok, vocab_size=320, max_model_len=64)
    _, params = proc.process(GenerateRequest([5] * 10, SamplingParams(max_tokens=None, min_tokens=54)))
    assert params.max_tokens == 54
    with pytest.raises(InvalidRequestError, match=r"min_tokens \(55\) is over the context length 64"):
        proc.process(GenerateRequest([5] * 10, SamplingParams(max_tokens=None, min_tokens=55)))


@pytest.mark.parametrize("min_tokens, text", [(0, "Paris is the "), (None, "Paris is the capital of France. Berlin is the ")])
def test_stop_strings_wait_for_min_tokens(tok, min_tokens, text):
    ids = tok.encode("Paris is the capital of France. Berlin is the capital of Germany.")
    first = next(i for i, t in enumerate(ids) if tok.decode([t]) == " capital")
    if min_tokens is None:
        min_tokens = first + 2  # past the first " capital": the second one stops it
    stream = OutputStream(tok, "r", [1], SamplingParams(stop=("capital",), max_tokens=len(ids), min_tokens=min_tokens))
    outs = []
    for t in ids:
        outs.append(stream.add(t, None, None, None))
        if outs[-1].finished:
            break
    assert outs[-1].finish_reason == "stop" and stream.hit_stop_string
    assert "".join(o.text for o in outs) == text
