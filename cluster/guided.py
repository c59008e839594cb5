"""Structured outputs: a JSON Schema (response_format) or a Lark grammar (forced tool calls) becomes
a grammar (llguidance), the grammar a token mask per step.

The engine keeps one matcher per constrained sequence, beside its tokens: before a step it
computes the bitmask of tokens the grammar allows next (one bit per token), the worker that
samples rules the others out (model.sampling.apply_token_masks), and the sampled token advances
the matcher. The matcher lives in the engine, not in a worker, so preemption, recompute and a new
gang after a failure leave it as it is: it has seen exactly the tokens the sequence holds.

A grammar is compiled once into a template matcher (bounded LRU); each sequence starts from a copy.
Sequences without one cost nothing: no matcher, no mask.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf

from cluster.protocol import InvalidRequestError

GRAMMAR_CACHE_SIZE = 256  # distinct schemas kept compiled
# JSON as the grammar writes it: no free whitespace (a model cannot wander off into blanks); oneOf
# is taken as anyOf (a grammar cannot check that exactly one branch matches; without this, a oneOf
# whose branches may overlap is refused).
COMPILE_OPTIONS = {"whitespace_flexible": False, "coerce_one_of": True}


class GuidedDecoding:
    def __init__(self, hf_tokenizer):
        self._hf_tokenizer = hf_tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use (~1 s)
        self._templates: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # matchers are compiled off the event loop

    def matcher(self, params) -> llguidance.LLMatcher:
        """A fresh matcher for the params' json_schema or lark_grammar; InvalidRequestError (a 400)
        when it does not compile."""
        key = ("json", params.json_schema) if params.json_schema is not None else ("lark", params.lark_grammar)
        with self._lock:
            template = self._templates.get(key)
            if template is None:
                template = self._compile(*key)
                self._templates[key] = template
                if len(self._templates) > GRAMMAR_CACHE_SIZE:
                    self._templates.popitem(last=False)
            else:
                self._templates.move_to_end(key)
            return template.deep_copy()

    def _compile(self, kind: str, text: str) -> llguidance.LLMatcher:
        if self._tokenizer is None:
            # The tokenizer's own vocabulary and EOS: ids past it (a model's padding rows) have no text,
            # so the mask leaves them out and model.sampling.apply_token_masks rules them out.
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
        what = "response_format schema" if kind == "json" else "tool call grammar (from the tools' parameters)"
        if kind == "json":
            try:
                text = llguidance.LLMatcher.grammar_from_json_schema(json.loads(text), overrides=COMPILE_OPTIONS)
            except (ValueError, TypeError) as e:
                raise InvalidRequestError(f"{what} is not usable: {e}") from None
        matcher = llguidance.LLMatcher(self._tokenizer, text, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"{what} is not supported: {matcher.get_error()}")
        return matcher

    @staticmethod
    def mask(matcher: llguidance.LLMatcher) -> bytes:
        """The tokens the grammar allows next, one bit each (little-endian 32-bit words)."""
        return matcher.compute_bitmask()
