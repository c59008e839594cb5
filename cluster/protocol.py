"""What the engine takes and gives: one request in, a stream of outputs back, and its errors and stats.

Plain data without torch or Ray, so the serving layer (router and replica) passes these same
types over the wire and the router never loads the model's dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from model.sampling_params import SamplingParams

ChatMessage = dict  # {"role": ..., "content": ...}, as chat templates take them
Prompt = Union[str, list[ChatMessage], list[int]]


@dataclass(frozen=True)
class Resume:
    """What a request's stream already delivered from a replica that then failed: its tokens, and
    its finish reason when it had ended. The engine replays them (nothing is computed or sent for
    them) and goes on from there, as it does for its own gang's failure."""

    token_ids: tuple[int, ...]
    finish_reason: str | None = None


@dataclass(frozen=True)
class GenerateRequest:
    prompt: Prompt  # text, chat messages, or token ids
    params: SamplingParams  # params.max_tokens None: until the context is full
    raw: bool = False  # text as is, not wrapped in the model's chat template
    request_id: str | None = None  # None: the engine picks one
    tools: list[dict] | None = None  # OpenAI tool definitions, handed to the chat template
    resume: Resume | None = None  # continue a stream another replica began


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # the token's text on its own
    logprob: float
    top: list[tuple[str, float]]  # the most likely tokens at this position, with their logprobs


@dataclass
class RequestOutput:
    """One delta of a request's stream."""

    request_id: str
    text: str  # new text since the previous delta
    token_ids: list[int]  # new tokens since the previous delta
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of prompt_tokens, those whose KV came from the prefix cache


@dataclass(frozen=True)
class EngineStats:
    running: int  # sequences in the running batch
    waiting: int  # sequences waiting for room in the batch or the KV cache
    kv_blocks_free: int
    kv_blocks_total: int
    kv_blocks_cached: int  # free blocks still holding a reusable prefix
    # Cumulative since the engine started:
    preemptions: int
    prefix_cache_query_tokens: int  # prompt tokens of admitted sequences looked up in the cache
    prefix_cache_hit_tokens: int  # of those, tokens found (not computed)
    prefill_tokens_computed: int  # prompt (and recomputed) tokens the model actually ran

    @property
    def kv_cache_usage(self) -> float:
        """Share of the KV blocks held by sequences (cached-but-free prefix blocks count as free)."""
        return (self.kv_blocks_total - self.kv_blocks_free) / self.kv_blocks_total


class InvalidRequestError(ValueError):
    """The request can never run (empty, outside the vocabulary, longer than the context); nothing was queued."""


class EngineDeadError(RuntimeError):
    """The engine's gang failed; requests in flight end with this error."""


class GangError(RuntimeError):
    """The gang cannot serve: a worker died, hung, or failed a step."""
