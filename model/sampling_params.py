"""SamplingParams: how one request picks its tokens. Plain data without torch, so the router builds it too."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_LOGPROBS = 20
MAX_PENALTY = 2.0  # presence / frequency penalties, as OpenAI bounds them
MAX_LOGIT_BIAS = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. Validated on construction (ValueError names the field)."""

    max_tokens: int | None = 16  # None: until the context is full (the engine fills it in)
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 => off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; N: the chosen token's logprob plus the top N (0..20)
    # Structured output: the text must be JSON valid against this JSON Schema (its JSON text;
    # '{"type": "object"}' for any object). Enforced by a grammar while sampling (cluster/guided.py).
    json_schema: str | None = None
    # Or a Lark grammar (llguidance's dialect) the text must match: how forced tool calls are made.
    lark_grammar: str | None = None
    # Logits processing, as vLLM does it (model/sampling.py apply_logits_processing).
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    repetition_penalty: float = 1.0  # transformers-style, over prompt and output; 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs; a dict is accepted
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled (nor stop strings match) before this many

    def __post_init__(self) -> None:
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, low=0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=None)
        # Callers coming from JSON hand in lists (or a single stop string, as the OpenAI API allows);
        # store tuples so the params stay hashable and immutable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
        object.__setattr__(self, "stop", stop)
        stop_token_ids = tuple(self.stop_token_ids)
        for i, t in enumerate(stop_token_ids):
            _check_int(f"stop_token_ids[{i}]", t, low=0)
        object.__setattr__(self, "stop_token_ids", stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            raise ValueError(f"json_schema must be a JSON Schema's JSON text, got {type(self.json_schema).__name__}")
        if self.lark_grammar is not None and (not isinstance(self.lark_grammar, str) or self.json_schema is not None):
            raise ValueError("lark_grammar must be a grammar's text, and cannot come with json_schema")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0)
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_float(name, value)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}")
        _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        object.__setattr__(self, "logit_bias", _logit_bias_pairs(self.logit_bias))
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")

    @property
    def greedy(self) -> bool:
        """True when the choice is the argmax: temperature 0, or top_k 1 (the same token)."""
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalizes(self) -> bool:
        """True when sampling needs the request's token ids (presence, frequency or repetition penalty)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _logit_bias_pairs(value) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} map (keys are JSON strings), or (id, bias) pairs, as sorted
    (int, float) pairs: hashable, and equal params compare equal whatever the key order."""
    items = value.items() if isinstance(value, dict) else value
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise ValueError(f"logit_bias must map token ids to biases, got {value!r}")
    pairs: dict[int, float] = {}
    for item in items:
        try:
            key, bias = item
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias must map token ids to biases, got {item!r}") from None
        token = key
        if isinstance(key, str):  # JSON object keys are strings; "50256" means token 50256
            if not (key.isascii() and key.isdigit()):  # int() would also take " 5", "+5", "1_0"
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            token = int(key)
        _check_int(f"logit_bias key {key!r}", token, low=0)
        _check_float(f"logit_bias[{key!r}]", bias)
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias[{key!r}] must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}")
        if token in pairs:  # e.g. "7" and "07"
            raise ValueError(f"logit_bias names token {token} twice")
        pairs[token] = float(bias)
    return tuple(sorted(pairs.items()))


def _check_int(name: str, value, low: int | None) -> None:
    # bool is an int subclass; `max_tokens=True` is a caller bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
