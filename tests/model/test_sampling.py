"""Sampling: parameter validation, greedy/top-k/top-p semantics, seeds, batch independence, logprobs."""

import math

import numpy as np
import pytest
import torch

from model.sampling import SamplingParams, draw_uniform, sample

VOCAB = 49152  # the default model's vocabulary: exercises the real sizes, including top-k/top-p candidates


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def run(logits, params, seeds=None, steps=None):
    n = logits.shape[0]
    params = params if isinstance(params, list) else [params] * n
    return sample(logits, params, seeds if seeds is not None else list(range(n)), steps or [0] * n)


# ---- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1}, "temperature must be >= 0, got -1"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        ({"top_k": -1}, "top_k must be >= 0, got -1"),
        ({"top_k": 2.5}, "top_k must be an integer, got 2.5"),
        ({"max_tokens": 0}, "max_tokens must be >= 1, got 0"),
        ({"max_tokens": True}, "max_tokens must be an integer, got True"),
        ({"logprobs": 21}, "logprobs must be in 0..20, got 21"),
        ({"logprobs": -1}, "logprobs must be >= 0, got -1"),
        ({"stop": ("ok", "")}, "stop[1] must be a non-empty string, got ''"),
        ({"stop_token_ids": (3, -2)}, "stop_token_ids[1] must be >= 0, got -2"),
        ({"seed": "7"}, "seed must be an integer, got '7'"),
        ({"ignore_eos": 1}, "ignore_eos must be a bool, got 1"),
    ],
)
def test_invalid_params_name_field_and_value(kwargs, message):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert message in str(err.value)


def test_params_normalise_sequences_to_tuples():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[1, 2])
    assert p.stop == ("a", "b") and p.stop_token_ids == (1, 2)
    assert SamplingParams(stop="END").stop == ("END",)
    hash(p)  # frozen and hashable


def test_mismatched_lengths_rejected():
    with pytest.raises(ValueError, match="rows=2, params=1"):
        sample(random_logits(2, 10), [SamplingParams()], [0, 1], [0, 0])


# ---- greedy -----------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = random_logits(8)
    out = run(logits, SamplingParams(temperature=0))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8 and out.top_logprobs == [None] * 8


def test_top_k_one_is_greedy():
    logits = random_logits(8, seed=1)
    out = run(logits, SamplingParams(temperature=1.3, top_k=1))
    assert out.token_ids == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_tiny_top_p_is_greedy(temperature):
    # Scale 1 keeps the distribution flat, so only the top_p cut (not a peaked softmax) makes it greedy.
    logits = random_logits(16, seed=2, scale=1.0)
    out = run(logits, SamplingParams(temperature=temperature, top_p=1e-6))
    assert out.token_ids == logits.argmax(-1).tolist()


# ---- seeds and batch independence -------------------------------------------------------------------


def test_same_seed_same_tokens_and_different_seeds_differ():
    logits = random_logits(1, scale=1.0).expand(32, VOCAB)
    params = SamplingParams(temperature=1.0)
    first = run(logits, params, seeds=[7] * 32).token_ids
    assert len(set(first)) == 1  # same (seed, step) on the same logits: same token every time
    assert run(logits, params, seeds=[7] * 32).token_ids == first
    varied = run(logits, params, seeds=list(range(32))).token_ids
    assert len(set(varied)) > 24  # near-flat logits over 49k ids: distinct seeds give distinct tokens


def test_step_changes_the_draw():
    logits = random_logits(1, scale=1.0).expand(32, VOCAB)
    out = run(logits, SamplingParams(), seeds=[7] * 32, steps=list(range(32))).token_ids
    assert len(set(out)) > 24


def test_row_result_independent_of_batch_neighbours():
    logits = random_logits(6, seed=3, scale=2.0)
    params = [
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.2, top_k=40),
        SamplingParams(temperature=0.9, top_p=0.9),
        SamplingParams(temperature=1.0, top_k=500, top_p=0.95, logprobs=3),
        SamplingParams(temperature=2.0, top_p=0.99),  # wide nucleus: takes the full-sort path
    ]
    seeds, steps = [11, 12, 13, 14, 15, 16], [0, 5, 9, 2, 7, 1]
    batched = sample(logits, params, seeds, steps)
    for i in range(6):
        alone = sample(logits[i : i + 1], [params[i]], [seeds[i]], [steps[i]])
        assert alone.token_ids[0] == batched.token_ids[i], f"row {i}"
        assert alone.logprobs[0] == batched.logprobs[i]
    # The same rows in another order and among other neighbours.
    order = [5, 3, 1, 4, 0, 2]
    shuffled = sample(
        torch.cat([logits[order], random_logits(2, seed=9)]),
        [params[i] for i in order] + [SamplingParams(top_k=7), SamplingParams(top_p=0.5)],
        [seeds[i] for i in order] + [1, 2],
        [steps[i] for i in order] + [0, 0],
    )
    assert shuffled.token_ids[:6] == [batched.token_ids[i] for i in order]


# ---- the distribution -------------------------------------------------------------------------------

# Draw counts below are fixed and the seeds are 0..N-1, so every test here is deterministic. The bounds
# are five binomial standard deviations (sqrt(p(1-p)/N) <= 0.5/sqrt(4000) = 0.0079, so 0.04): a correct
# sampler lands inside with overwhelming probability for any seed set, and each bound is far tighter
# than the gap a wrong rule would produce (noted per test).
N_DRAWS = 4000
FIVE_SIGMA = 5 * 0.5 / math.sqrt(N_DRAWS)


def frequencies(logits_row: torch.Tensor, params: SamplingParams) -> np.ndarray:
    logits = logits_row.unsqueeze(0).expand(N_DRAWS, -1)
    ids = run(logits, params).token_ids
    return np.bincount(ids, minlength=logits_row.shape[0]) / N_DRAWS


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_scales_the_distribution(temperature):
    # Two live tokens with logits 0 and 1: P(token 1) = sigmoid(1 / T) = 0.88 / 0.73 / 0.62, so
    # ignoring or inverting the temperature misses by >= 0.11, well outside the 0.04 bound.
    row = torch.tensor([0.0, 1.0] + [-math.inf] * 6)
    freq = frequencies(row, SamplingParams(temperature=temperature))
    expected = 1 / (1 + math.exp(-1 / temperature))
    assert abs(freq[1] - expected) < FIVE_SIGMA
    assert freq[2:].sum() == 0


def test_top_k_keeps_only_k_tokens_renormalised():
    # probs 0.4, 0.3, 0.2, 0.1 -> top_k=2 renormalises to 4/7, 3/7 (without renormalising: 0.4).
    row = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    freq = frequencies(row, SamplingParams(top_k=2))
    assert freq[2] == freq[3] == 0
    assert abs(freq[0] - 4 / 7) < FIVE_SIGMA


def test_top_p_keeps_the_nucleus():
    # probs 0.5, 0.3, 0.15, 0.05 and top_p=0.7: mass before token 2 is 0.8 >= 0.7, so only 0 and 1
    # remain, with P(0) = 0.5 / 0.8 = 0.625 (vs 0.5 if the cut were ignored).
    row = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    freq = frequencies(row, SamplingParams(top_p=0.7))
    assert freq[2] == freq[3] == 0
    assert abs(freq[0] - 0.625) < FIVE_SIGMA


def test_top_p_applies_after_top_k():
    # top_k=3 renormalises to 0.526, 0.316, 0.158; mass before token 2 is 0.842 < 0.9, so all three stay
    # (were top_p measured on the raw distribution, token 2 would still stay; token 3 never may).
    row = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    freq = frequencies(row, SamplingParams(top_k=3, top_p=0.9))
    assert freq[3] == 0 and freq[2] > 0.1
    assert abs(freq[0] - 0.5 / 0.95) < FIVE_SIGMA


@pytest.mark.parametrize(
    "vocab, decay, past",
    [(1000, 1e-3, 300), (VOCAB, math.log(10) / 1000, 300)],
    ids=["full_sort", "second_tier"],
)
def test_wide_nucleus_beyond_the_first_candidates(vocab, decay, past):
    # Slowly decreasing logits: the top_p=0.9 nucleus holds hundreds of tokens, more than the 256
    # candidates looked at first, so a wider tier (4096 candidates, or the full sort when the
    # vocabulary is smaller than that) must be taken.
    row = -torch.arange(vocab, dtype=torch.float32) * decay
    probs = torch.softmax(row.double(), -1).numpy()
    cutoff = int(np.searchsorted(np.cumsum(probs) - probs, 0.9, side="left"))  # first excluded id
    assert 600 < cutoff < 4096
    params = SamplingParams(top_p=0.9)
    ids = run(row.unsqueeze(0).expand(500, -1), params).token_ids  # 500 draws: a 49k-wide batch stays cheap
    assert max(ids) > past  # reached past the first candidates
    assert max(ids) <= cutoff  # and not past the nucleus (+1 of slack for float32 cumsum at the edge)
    expected = [reference_draw(row.double().numpy(), params, draw_uniform(i, 0)) for i in range(200)]
    # ~1000 boundaries of float32 vs float64 CDFs: a u within ~1e-7 of one may flip; allow 2 in 200.
    assert sum(a != b for a, b in zip(ids[:200], expected)) <= 2


def reference_draw(logits_row: np.ndarray, p: SamplingParams, u: float) -> int:
    """Textbook sampler in float64: temperature, top-k, top-p (on the renormalised top-k), inverse CDF.

    The CDF runs in vocabulary order when nothing is filtered (no sort needed) and in descending
    probability order otherwise, as in model/sampling.py; both map u to the same distribution.
    """
    probs = np.exp((logits_row - logits_row.max()) / p.temperature)
    probs /= probs.sum()
    filtered = p.top_k > 0 or p.top_p < 1
    order = np.argsort(-probs, kind="stable") if filtered else np.arange(len(probs))
    sorted_probs = probs[order]
    if p.top_k:
        sorted_probs[p.top_k :] = 0
        sorted_probs /= sorted_probs.sum()
    keep = (np.cumsum(sorted_probs) - sorted_probs) < p.top_p
    keep[0] = True
    sorted_probs = np.where(keep, sorted_probs, 0)
    cdf = np.cumsum(sorted_probs)
    return int(order[min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1)])


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=50),
        SamplingParams(temperature=1.5, top_p=0.8),
        SamplingParams(temperature=0.9, top_k=20, top_p=0.6),
        SamplingParams(temperature=1.2, top_k=60000, top_p=0.8),  # k above the vocabulary: a full sort
    ],
    ids=["temperature", "top_k", "top_p", "top_k+top_p", "huge_top_k"],
)
def test_matches_reference_sampler(params):
    logits = random_logits(24, seed=4, scale=4.0)
    seeds, steps = list(range(100, 124)), list(range(24))
    out = sample(logits, [params] * 24, seeds, steps)
    mismatches = 0
    for i in range(24):
        expected = reference_draw(logits[i].double().numpy(), params, draw_uniform(seeds[i], steps[i]))
        mismatches += out.token_ids[i] != expected
    # float32 vs float64 CDFs disagree only when u falls within ~1e-6 of a boundary: practically never.
    assert mismatches == 0


# ---- logprobs -------------------------------------------------------------------------------------


def test_logprobs_are_log_softmax_of_raw_logits():
    logits = random_logits(4, seed=5)
    params = [
        SamplingParams(temperature=0.5, logprobs=5),  # tempered draw, un-tempered logprobs
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=1.0, top_k=10, logprobs=20),
        SamplingParams(temperature=1.0),
    ]
    out = sample(logits, params, [1, 2, 3, 4], [0, 0, 0, 0])
    reference = torch.log_softmax(logits.double(), -1)
    for i in range(3):
        assert out.logprobs[i] == pytest.approx(reference[i, out.token_ids[i]].item(), abs=1e-5)
    top_vals, top_ids = reference[0].topk(5)
    assert [t for t, _ in out.top_logprobs[0]] == top_ids.tolist()
    assert [v for _, v in out.top_logprobs[0]] == pytest.approx(top_vals.tolist(), abs=1e-5)
    assert out.top_logprobs[1] == []
    assert len(out.top_logprobs[2]) == 20
    assert out.token_ids[1] == logits[1].argmax().item()
    assert out.logprobs[3] is None and out.top_logprobs[3] is None
