"""Turning last-position logits into tokens: greedy, temperature, top-k, top-p, seeds, logprobs;
before that, per-request logits processing (min_tokens, logit_bias, penalties).

Sampling is stateless. A random row draws one uniform number from a CPU ``torch.Generator``
seeded by its request seed and the number of tokens the request generated so far (its step),
then picks a token by inverse CDF over the filtered distribution. So a request's output depends
only on its own logits, parameters, seed and step: not on which other requests share the batch,
not on the device, and not on whether it was preempted and recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.sampling_params import SamplingParams

# A top-p row looks for its nucleus among its most likely tokens, in widening tiers: torch.topk of
# 256 / 4096 of a 49k vocabulary costs ~1/20 / ~1/6 of a full sort (measured on CPU). A peaked
# model distribution is covered by the first tier; only rows whose nucleus is wider still sort.
TOP_P_CANDIDATE_TIERS = (256, 4096)

_MASK64 = (1 << 64) - 1


@dataclass
class SampleOutput:
    """Per row: the chosen token, its logprob (None unless asked) and the top-N (id, logprob) list."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


def draw_uniform(seed: int, step: int) -> float:
    """The one uniform number in [0, 1) that a request uses at a step; a function of (seed, step) only."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(_mix_seed(seed, step))
    return torch.rand((), dtype=torch.float64, generator=generator).item()


def _mix_seed(seed: int, step: int) -> int:
    """splitmix64 over (seed, step): neighbouring seeds/steps give unrelated generator seeds."""
    z = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + (step & _MASK64) + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample(logits: Tensor, params: list[SamplingParams], seeds: list[int], steps: list[int]) -> SampleOutput:
    """Pick one token per row of ``logits`` (N, V) float32.

    Greedy rows share one argmax; rows sampling from the full vocabulary share one softmax and
    cumsum; only rows with top-k / top-p sort, and then only their top candidates (see
    TOP_P_CANDIDATE_TIERS). Logprobs come from log_softmax of the raw, un-tempered logits.
    """
    num_rows, vocab_size = logits.shape
    if not (len(params) == len(seeds) == len(steps) == num_rows):
        raise ValueError(
            f"sample needs one params/seed/step per logits row: rows={num_rows}, "
            f"params={len(params)}, seeds={len(seeds)}, steps={len(steps)}"
        )
    device = logits.device
    token_ids = torch.empty(num_rows, dtype=torch.long, device=device)

    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    if greedy_rows:
        index = torch.tensor(greedy_rows, device=device)
        token_ids[index] = logits[index].argmax(dim=-1)

    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        full_rows = [i for i in random_rows if params[i].top_k == 0 and params[i].top_p == 1.0]
        if full_rows:
            token_ids[torch.tensor(full_rows, device=device)] = _draw_full(logits, full_rows, params, seeds, steps)
        filtered_rows = [i for i in random_rows if not (params[i].top_k == 0 and params[i].top_p == 1.0)]
        for width, rows in _group_by_candidate_width(filtered_rows, params, vocab_size).items():
            chosen, uncovered = _draw_filtered(logits, rows, params, seeds, steps, width)
            token_ids[torch.tensor(rows, device=device)] = chosen
            # Nucleus wider than the candidates: redo those rows with the next tier, at last the full vocabulary.
            wider = [w for w in TOP_P_CANDIDATE_TIERS if w > width and w < vocab_size] + [vocab_size]
            for next_width in wider:
                if not uncovered:
                    break
                chosen, still_uncovered = _draw_filtered(logits, uncovered, params, seeds, steps, next_width)
                token_ids[torch.tensor(uncovered, device=device)] = chosen
                uncovered = still_uncovered

    ids = token_ids.tolist()
    logprobs: list[float | None] = [None] * num_rows
    top_logprobs: list[list[tuple[int, float]] | None] = [None] * num_rows
    lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if lp_rows:
        index = torch.tensor(lp_rows, device=device)
        row_logprobs = torch.log_softmax(logits[index].float(), dim=-1)  # (R, V)
        chosen = row_logprobs.gather(1, token_ids[index].unsqueeze(1)).squeeze(1).tolist()
        num_top = max(params[i].logprobs for i in lp_rows)
        top_vals, top_ids = (row_logprobs.topk(num_top, dim=-1) if num_top else (None, None))
        top_vals = top_vals.tolist() if num_top else None
        top_ids = top_ids.tolist() if num_top else None
        for r, i in enumerate(lp_rows):
            logprobs[i] = chosen[r]
            n = params[i].logprobs
            top_logprobs[i] = [(top_ids[r][j], top_vals[r][j]) for j in range(n)] if n else []
    return SampleOutput(token_ids=ids, logprobs=logprobs, top_logprobs=top_logprobs)


def apply_token_masks(logits: Tensor, masks: dict[int, bytes]) -> None:
    """Rule out, in place, the tokens a row's grammar forbids: masks[row] holds one bit per token
    (little-endian 32-bit words, bit set = allowed), as cluster/guided.py computes them."""
    rows = list(masks)
    words = torch.frombuffer(bytearray(b"".join(masks[r] for r in rows)), dtype=torch.int32).view(len(rows), -1)
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).view(len(rows), -1).bool()  # (R, 32 * words)
    vocab = logits.shape[1]
    if allowed.shape[1] < vocab:  # tokens past the grammar's vocabulary are never allowed
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed[:, :vocab].to(logits.device), float("-inf"))


def apply_logits_processing(logits: Tensor, params: list[SamplingParams], token_ids: dict[int, tuple[list[int], list[int]]],
                            banned: dict[int, list[int]]) -> None:  # fmt: skip
    """Adjust, in place, the rows that ask for it, in vLLM's order: min_tokens bans, logit_bias,
    then the repetition, frequency and presence penalties (temperature, top-k, top-p come after, in
    ``sample``).

    banned[row]: token ids the row may not sample yet (min_tokens: its EOS and stop token ids);
    token_ids[row]: (prompt ids, output ids) of a row with a penalty (the prompt ids may be left
    empty when it has no repetition penalty). Each row is adjusted element-wise from its own data
    only, so its result does not depend on its batch; rows in neither map and without logit_bias
    cost one attribute check.
    """
    device = logits.device
    vocab = logits.shape[1]
    if banned:
        # A stop token id past the vocabulary can never be sampled anyway (and would not index).
        rows, cols = _row_col(list(banned), [[t for t in banned[r] if t < vocab] for r in banned], device)
        logits[rows, cols] = float("-inf")
    bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
    if bias_rows:  # ids were checked against the vocabulary when the request came in (cluster/processing.py)
        rows, cols = _row_col(bias_rows, [[t for t, _ in params[i].logit_bias] for i in bias_rows], device)
        bias = torch.tensor([b for i in bias_rows for _, b in params[i].logit_bias], dtype=logits.dtype, device=device)
        logits.index_put_((rows, cols), bias, accumulate=True)
    if token_ids:
        _apply_penalties(logits, params, token_ids)


def _apply_penalties(logits: Tensor, params: list[SamplingParams], token_ids: dict[int, tuple[list[int], list[int]]]) -> None:
    device = logits.device
    rows = list(token_ids)
    index = torch.tensor(rows, device=device)
    x = logits[index]  # (R, V), a copy
    local = range(len(rows))
    out_rows, out_cols = _row_col(local, [token_ids[r][1] for r in rows], device)
    counts = torch.zeros_like(x)  # (R, V): how often each token is in the row's output so far
    counts.index_put_((out_rows, out_cols), torch.ones_like(out_cols, dtype=x.dtype), accumulate=True)
    if any(params[r].repetition_penalty != 1 for r in rows):
        # transformers' rule: a seen token's logit moves towards "less likely" by the factor r,
        # dividing a positive logit and multiplying a negative one. Prompt and output both count.
        seen = counts > 0
        prompt_rows, prompt_cols = _row_col(local, [token_ids[r][0] for r in rows], device)
        seen[prompt_rows, prompt_cols] = True
        r = _column([params[i].repetition_penalty for i in rows], x)
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)  # r == 1 leaves a row exactly as it was
    # OpenAI's rule, over the output only: - f * count - p * (count > 0); 0 leaves a row exactly as it was.
    x -= _column([params[i].frequency_penalty for i in rows], x) * counts
    x -= _column([params[i].presence_penalty for i in rows], x) * (counts > 0)
    logits[index] = x


def _row_col(rows, ids_per_row: list[list[int]], device) -> tuple[Tensor, Tensor]:
    """Flattened (row, token id) index pairs: rows[k] repeated once per id in ids_per_row[k]."""
    row_index = [r for r, ids in zip(rows, ids_per_row) for _ in ids]
    col_index = [t for ids in ids_per_row for t in ids]
    return (torch.tensor(row_index, dtype=torch.long, device=device),
            torch.tensor(col_index, dtype=torch.long, device=device))  # fmt: skip


def _column(values: list[float], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)  # (R, 1)


def _uniforms(rows: list[int], seeds: list[int], steps: list[int], device) -> Tensor:
    # (R, 1): drawn on the CPU so the stream is the same on every device.
    u = [draw_uniform(seeds[i], steps[i]) for i in rows]
    return torch.tensor(u, dtype=torch.float64).unsqueeze(1).to(device)


def _temperatures(rows: list[int], params: list[SamplingParams], device) -> Tensor:
    return torch.tensor([params[i].temperature for i in rows], dtype=torch.float32, device=device).unsqueeze(1)


def _inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Per row, the first position whose cumulative mass exceeds u * total. probs (R, K), u (R, 1)."""
    cdf = probs.cumsum(dim=-1)  # (R, K)
    target = (u * cdf[:, -1:].double()).to(cdf.dtype)
    pos = torch.searchsorted(cdf, target, right=True)  # (R, 1)
    return pos.clamp_(max=probs.shape[1] - 1).squeeze(1)


def _draw_full(logits, rows, params, seeds, steps) -> Tensor:
    index = torch.tensor(rows, device=logits.device)
    probs = torch.softmax(logits[index].float() / _temperatures(rows, params, logits.device), dim=-1)  # (R, V)
    return _inverse_cdf(probs, _uniforms(rows, seeds, steps, logits.device))


def _group_by_candidate_width(rows, params, vocab_size) -> dict[int, list[int]]:
    """Rows keyed by how many top tokens they look at; a row's width depends on its own params only,
    so its result does not change with its batch neighbours."""
    groups: dict[int, list[int]] = {}
    for i in rows:
        p = params[i]
        width = p.top_k if p.top_k > 0 else TOP_P_CANDIDATE_TIERS[0]
        groups.setdefault(min(width, vocab_size), []).append(i)
    return groups


def _draw_filtered(logits, rows, params, seeds, steps, width) -> tuple[Tensor, list[int]]:
    """Top-k then top-p over each row's ``width`` most likely tokens, then an inverse-CDF draw.

    Returns the chosen ids and the top-p-only rows whose nucleus was not inside the candidates.
    """
    device = logits.device
    index = torch.tensor(rows, device=device)
    probs = torch.softmax(logits[index].float() / _temperatures(rows, params, device), dim=-1)  # (R, V)
    if width < probs.shape[1]:
        cand_probs, cand_ids = probs.topk(width, dim=-1)  # (R, W), sorted descending
    else:
        cand_probs, cand_ids = probs.sort(dim=-1, descending=True, stable=True)
    # A top-k row's width is its k, so the candidates already are its top-k tokens.
    # top-p on the top-k renormalised distribution (top-p-only rows: the whole distribution, mass 1);
    # a token stays while the mass before it is < top_p.
    mass = cand_probs.sum(dim=-1, keepdim=True)  # (R, 1)
    has_top_k = torch.tensor([params[i].top_k > 0 for i in rows], device=device).unsqueeze(1)
    mass_before = (cand_probs.cumsum(dim=-1) - cand_probs) / torch.where(has_top_k, mass, 1.0)
    top_p = torch.tensor([params[i].top_p for i in rows], dtype=torch.float32, device=device).unsqueeze(1)
    keep = mass_before < top_p
    keep[:, 0] = True
    cand_probs = cand_probs.masked_fill(~keep, 0.0)

    uncovered: list[int] = []
    if width < probs.shape[1]:
        # A top-p-only row is covered when its candidates' total mass reaches top_p.
        covered = (mass.squeeze(1) >= top_p.squeeze(1)).tolist()
        uncovered = [i for r, i in enumerate(rows) if params[i].top_k == 0 and not covered[r]]
    pos = _inverse_cdf(cand_probs, _uniforms(rows, seeds, steps, device))  # (R,)
    return cand_ids.gather(1, pos.unsqueeze(1)).squeeze(1), uncovered
