"""Text in and out: loading the tokenizer, building prompts, and streaming detokenization."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

# How many tokens before the unread ones are decoded with them, so that a token's text comes out
# the way it does inside a sentence (sentencepiece drops a leading space at the start of a decode).
PREFIX_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


def load_tokenizer(model_dir) -> PreTrainedTokenizerBase:
    """The tokenizer saved next to the model; local files only, never a hub download."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"tokenizer directory {str(path)!r} does not exist or is not a directory")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"no usable tokenizer in {str(path)!r} (expected tokenizer.json or tokenizer_config.json "
            f"with its vocabulary files): {exc}"
        ) from exc


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], *, raw: bool = False,
                  tools: list[dict] | None = None) -> list[int]:  # fmt: skip
    """Token ids for a prompt string or a list of chat messages.

    Unless ``raw``, a tokenizer with a chat template wraps the prompt in it (a string becomes one
    user message) and adds the assistant generation prompt; ``tools`` (OpenAI tool definitions)
    go to the template too. Otherwise a string is encoded as is, with BOS when the tokenizer adds
    one. Chat messages need a chat template.
    """
    if isinstance(prompt, str):
        messages = None
    elif isinstance(prompt, list):
        messages = _check_messages(prompt)
    else:
        raise ValueError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")

    use_template = not raw and getattr(tokenizer, "chat_template", None)
    if messages is not None and not use_template:
        why = "raw=True" if raw else "this tokenizer has no chat template"
        raise ValueError(f"chat messages cannot be encoded: {why}; send a plain text prompt instead")

    if use_template:
        if messages is None:
            messages = [{"role": "user", "content": prompt}]
        # Render to text, then encode without special tokens: templates that want BOS write it
        # themselves, and adding it again would double it.
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt is empty: it encodes to 0 tokens")
    return list(ids)


def _check_messages(messages: list) -> list[dict]:
    if not messages:
        raise ValueError("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r}")
    return messages


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text deltas as they arrive.

    Two kinds of text are held back: bytes of a multi-byte character whose other bytes are in
    tokens still to come (the decode ends in U+FFFD), and text that could be the start of a stop
    string. Emitted text never changes afterwards, so a client may print every delta at once.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.skip_special_tokens = skip_special_tokens
        # Decode window: tokens[prefix_offset:read_offset] were already turned into text and serve as
        # context; tokens[read_offset:] are not yet.
        self._tokens = list(prompt_ids[-PREFIX_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._pending = ""  # decoded, but maybe the start of a stop string
        self.stopped = False
        self.text = ""  # all emitted text so far

    def add(self, token_id: int, check_stop: bool = True) -> tuple[str, bool]:
        """Feed one generated token; returns (text to emit now, a stop string was hit). With
        ``check_stop`` False (min_tokens not reached) no stop string ends the text yet, but a
        possible start of one is still held back, so one ending in a later token is found."""
        if self.stopped:
            return "", True
        self._tokens.append(token_id)
        return self._emit(self._decode_new(final=False), check_stop=check_stop)

    def flush(self) -> str:
        """Release held-back text at the end of generation (an unfinished character decodes as U+FFFD)."""
        if self.stopped:
            return ""
        delta, _ = self._emit(self._decode_new(final=True), final=True)
        return delta

    def _decode_new(self, final: bool) -> str:
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._tokens[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(REPLACEMENT_CHAR) and not final):
            return ""  # nothing new yet (special token skipped) or a character still incomplete
        # Slide the window: the text read so far becomes the context for the next token.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, delta: str, final: bool = False, check_stop: bool = True) -> tuple[str, bool]:
        text = self._pending + delta
        self._pending = ""
        if self.stop:
            cut = _find_stop(text, self.stop) if check_stop else None
            if cut is not None:
                self.stopped = True
                text = text[:cut]
            elif not final:
                held = _partial_stop_len(text, self.stop)
                if held:
                    text, self._pending = text[:-held], text[-held:]
        self.text += text
        return text, self.stopped


def _find_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string starts in text, or None."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _partial_stop_len(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
