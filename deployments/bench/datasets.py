"""The request sets a benchmark sends: each a list of ``BenchRequest`` built with a fixed seed.

- ``chat``: the mixed chat set shipped in data/chat.jsonl (48 conversations: one-line questions,
  system prompts, a multi-turn exchange, code; max_tokens 16..128, 70 on average), cycled.
- ``fixed``: every request the same prompt length and output length (``--input-len``, ``--output-len``).
- ``random``: random token ids of lengths drawn from ranges, decoded to text.
- ``shared-prefix``: one long system prompt (``--prefix-len`` tokens) and a different short question each.

``fixed``, ``random`` and ``shared-prefix`` count tokens with the served model's tokenizer. The
servers apply their own chat template, so the prompt tokens a server reports are a few more than
the lengths asked for here; the runner reports what the servers say.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

CHAT_FILE = Path(__file__).parent / "data" / "chat.jsonl"
NAMES = ("chat", "fixed", "random", "shared-prefix")

# Plain words to build prompts of a given token length from; the seed picks the order.
_WORDS = (
    "the service keeps a queue of requests and answers each one in order while the cluster grows and "
    "shrinks with load engineers watch latency throughput memory and errors on a dashboard every morning "
    "a model reads the prompt computes its cache and writes tokens one after another until it stops"
).split()


@dataclass(frozen=True)
class BenchRequest:
    messages: list[dict]  # one chat conversation
    max_tokens: int


def load(name: str, num_requests: int, *, tokenizer=None, input_len: int = 128, output_len: int = 128,
         prefix_len: int = 1024, seed: int = 0) -> list[BenchRequest]:
    """``num_requests`` requests of the named set; ``tokenizer`` is needed by all but ``chat``."""
    if name not in NAMES:
        raise ValueError(f"dataset must be one of {', '.join(NAMES)}, got {name!r}")
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if name == "chat":
        return chat(num_requests)
    if tokenizer is None:
        raise ValueError(f"the {name!r} dataset needs the model's tokenizer (--tokenizer)")
    rng = random.Random(seed)
    if name == "fixed":
        return [BenchRequest(_user(text_of_length(tokenizer, input_len, rng)), output_len) for _ in range(num_requests)]
    if name == "random":
        return [
            BenchRequest(_user(random_text(tokenizer, rng.randint(max(1, input_len // 2), input_len), rng)),
                         rng.randint(max(1, output_len // 2), output_len))
            for _ in range(num_requests)
        ]  # fmt: skip
    system = text_of_length(tokenizer, prefix_len, rng)
    return [
        BenchRequest([{"role": "system", "content": system},
                      {"role": "user", "content": f"Question {i}: {text_of_length(tokenizer, 16, rng)}?"}], output_len)
        for i in range(num_requests)
    ]  # fmt: skip


def chat(num_requests: int) -> list[BenchRequest]:
    rows = [json.loads(line) for line in CHAT_FILE.read_text().splitlines() if line.strip()]
    return [BenchRequest(rows[i % len(rows)]["messages"], rows[i % len(rows)]["max_tokens"]) for i in range(num_requests)]


def text_of_length(tokenizer, num_tokens: int, rng: random.Random) -> str:
    """Text of plain words that encodes to num_tokens tokens (without special tokens)."""
    words = [rng.choice(_WORDS) for _ in range(num_tokens)]  # a word is at least one token
    ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[:num_tokens]
    return tokenizer.decode(ids)


def random_text(tokenizer, num_tokens: int, rng: random.Random) -> str:
    """Random token ids (special tokens left out), decoded: what vLLM's "random" dataset sends."""
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    return tokenizer.decode([rng.choice(vocab) for _ in range(num_tokens)])


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]
