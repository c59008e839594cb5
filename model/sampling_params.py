"""SamplingParams: how one request picks its tokens. Plain data without torch, so the router builds it too."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_LOGPROBS = 20


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
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0)
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        """True when the choice is the argmax: temperature 0, or top_k 1 (the same token)."""
        return self.temperature == 0 or self.top_k == 1


def _check_int(name: str, value, low: int | None) -> None:
    # bool is an int subclass; `max_tokens=True` is a caller bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
