"""Text in and out of the engine, once per request: tokenize and check the prompt, fill in the
defaults, then turn each sampled token into a text delta and name its logprob tokens."""

from __future__ import annotations

import dataclasses

from cluster.protocol import GenerateRequest, InvalidRequestError, RequestOutput, TokenLogprob
from model.sampling_params import SamplingParams
from model.tokenizer import IncrementalDetokenizer, encode_prompt


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self._max_token_bytes: int | None = None  # the longest token's text in UTF-8 bytes, found on first need

    def _refuse_if_surely_too_long(self, prompt) -> None:
        """Refuse text that cannot fit in the context however it tokenizes, without tokenizing it:
        no token carries more than the vocabulary's longest text, so a prompt has at least
        bytes / that many tokens. Tokenizing megabytes takes seconds; this takes microseconds."""
        if isinstance(prompt, str):
            nbytes = len(prompt.encode())
        elif isinstance(prompt, list):
            nbytes = sum(len(m.get("content", "").encode()) for m in prompt if isinstance(m, dict)
                         and isinstance(m.get("content"), str))  # fmt: skip
        else:
            return
        if nbytes <= self.max_model_len:  # every token carries at least one byte, so no bound can refuse it
            return
        if self._max_token_bytes is None:
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._max_token_bytes = max(len(t.encode()) for t in texts)
        min_tokens = -(-nbytes // self._max_token_bytes)
        if min_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt is too long: its {nbytes} bytes make at least {min_tokens} tokens, "
                f"over the context length {self.max_model_len}"
            )

    def process(self, request: GenerateRequest) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and the params with max_tokens filled in; InvalidRequestError
        for what can never run, before anything is queued."""
        prompt = request.prompt
        try:
            if isinstance(prompt, list) and all(type(t) is int for t in prompt):
                ids = list(prompt)  # token ids (an empty list is refused below)
            else:
                self._refuse_if_surely_too_long(prompt)
                ids = encode_prompt(self.tokenizer, prompt, raw=request.raw, tools=request.tools)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
        if not ids:
            raise InvalidRequestError("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        params = request.params
        outside = [t for t, _ in params.logit_bias if t >= self.vocab_size]  # the sampler would index past its row
        if outside:
            raise InvalidRequestError(f"logit_bias token id {outside[0]} is outside the vocabulary (size {self.vocab_size})")
        if params.max_tokens is None:  # OpenAI's default: the rest of the context
            if len(ids) >= self.max_model_len:
                raise InvalidRequestError(
                    f"prompt ({len(ids)} tokens) leaves no room to generate in the context length {self.max_model_len}"
                )
            if params.min_tokens > self.max_model_len - len(ids):
                raise InvalidRequestError(
                    f"prompt ({len(ids)} tokens) plus min_tokens ({params.min_tokens}) is over the context length "
                    f"{self.max_model_len}"
                )
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(ids))
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) is {total}, "
                f"over the context length {self.max_model_len}"
            )
        return ids, params


class OutputStream:
    """One request's way out: sampled tokens become text deltas (held back while they may begin a
    stop string or end inside a character), logprobs get their tokens' text."""

    def __init__(self, tokenizer, request_id: str, prompt_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.request_id = request_id
        self.prompt_tokens = len(prompt_ids)
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.stop)
        self.completion_tokens = 0
        self.min_tokens = params.min_tokens

    @property
    def hit_stop_string(self) -> bool:
        return self.detok.stopped

    def add(self, token: int, finish_reason: str | None, logprob: float | None,
            top: list[tuple[int, float]] | None, cached_tokens: int = 0) -> RequestOutput:
        """The delta for one sampled token; finish_reason is the scheduler's (None: it goes on).
        A stop string found here finishes the request too: then ``hit_stop_string`` is true."""
        self.completion_tokens += 1
        # As vLLM: stop strings are looked for only from the min_tokens-th token on (a string may begin earlier).
        text, hit_stop = self.detok.add(token, check_stop=self.completion_tokens >= self.min_tokens)
        if hit_stop:
            finish_reason = "stop"
        elif finish_reason is not None:
            text += self.detok.flush()  # text held back in case it began a stop string
        logprobs = None
        if logprob is not None:
            logprobs = [TokenLogprob(token, self._text(token), logprob, [(self._text(t), v) for t, v in top or []])]
        return RequestOutput(
            request_id=self.request_id,
            text=text,
            token_ids=[token],
            logprobs=logprobs,
            finished=finish_reason is not None,
            finish_reason=finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=cached_tokens,
        )

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])
