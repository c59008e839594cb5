"""Text in and out of the engine (cluster/processing.py), without a model or Ray: prompts become
checked token ids with max_tokens filled in, sampled tokens become text deltas with stop strings,
finish reasons and logprob tokens."""

from __future__ import annotations

import copy

import pytest

from cluster.processing import InputProcessor, OutputStream
from cluster.protocol import GenerateRequest, InvalidRequestError, TokenLogprob
from model.sampling_params import SamplingParams
from model.tokenizer import load_tokenizer
from tests.tiny_tokenizer import save_tiny_tokenizer

VOCAB = 320
CONTEXT = 64


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(save_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tok"), VOCAB))


@pytest.fixture
def proc(tok):
    return InputProcessor(tok, vocab_size=VOCAB, max_model_len=CONTEXT)


def req(prompt, raw=False, **params):
    return GenerateRequest(prompt, SamplingParams(**params), raw=raw)


# -- InputProcessor.process ----------------------------------------------------------------------
def test_token_ids_pass_through_unchanged(proc):
    """A list of ints is taken as token ids: not re-encoded, not wrapped in the chat template."""
    ids, params = proc.process(req([5, 0, 319, 5], max_tokens=3))
    assert ids == [5, 0, 319, 5]
    assert params.max_tokens == 3


def test_raw_text_is_encoded_as_is(tok, proc):
    """raw=True: the text goes through tokenizer.encode, with no chat template around it."""
    text = "Paris is the capital of France."
    ids, _ = proc.process(req(text, raw=True))
    assert ids == tok.encode(text)
    assert tok.decode(ids) == text


def test_text_without_raw_becomes_one_user_turn_of_the_chat_template(tok, proc):
    """raw=False with a template: the text is the content of one user message, plus the generation prompt."""
    ids, _ = proc.process(req("hi"))
    assert tok.decode(ids) == "user: hi\nassistant:"
    assert ids == tok.encode("user: hi\nassistant:", add_special_tokens=False)


def test_chat_messages_go_through_the_chat_template(tok, proc):
    """Chat messages are rendered with the tokenizer's template (tests/tiny_tokenizer.py's CHAT_TEMPLATE)."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital of France?"}]
    ids, _ = proc.process(req(messages))
    expected = "system: Be brief.\nuser: The capital of France?\nassistant:"
    assert tok.decode(ids) == expected
    assert ids == tok.encode(expected, add_special_tokens=False)


def test_chat_messages_without_a_chat_template_are_refused_clearly(tok):
    """A tokenizer without a template (and raw=True) cannot encode chat messages: InvalidRequestError says why."""
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidRequestError, match="this tokenizer has no chat template"):
        InputProcessor(plain, VOCAB, CONTEXT).process(req(messages))
    with pytest.raises(InvalidRequestError, match="raw=True"):
        InputProcessor(tok, VOCAB, CONTEXT).process(req(messages, raw=True))


def test_malformed_chat_message_is_refused(proc):
    """A message without string role/content is an InvalidRequestError naming its index."""
    with pytest.raises(InvalidRequestError, match=r"messages\[1\]"):
        proc.process(req([{"role": "user", "content": "hi"}, {"role": "user"}]))


def test_max_tokens_none_is_the_rest_of_the_context(proc):
    """max_tokens=None becomes max_model_len - prompt length; the caller's params object is left alone."""
    request = req([1] * 10, max_tokens=None)
    _, params = proc.process(request)
    assert params.max_tokens == CONTEXT - 10
    assert request.params.max_tokens is None
    assert params.temperature == request.params.temperature  # the other fields are kept


def test_prompt_plus_max_tokens_over_the_context_is_refused_with_the_numbers(proc):
    """prompt + max_tokens > max_model_len: the message names all three numbers and the total."""
    with pytest.raises(InvalidRequestError) as err:
        proc.process(req([1] * 60, max_tokens=10))
    assert str(err.value) == "prompt (60 tokens) plus max_tokens (10) is 70, over the context length 64"
    assert isinstance(err.value, ValueError)
    proc.process(req([1] * 54, max_tokens=10))  # exactly the context fits


def test_prompt_filling_the_whole_context_is_refused_even_without_max_tokens(proc):
    """With max_tokens=None a prompt of max_model_len tokens leaves no room for one token."""
    with pytest.raises(InvalidRequestError, match=r"prompt \(64 tokens\) leaves no room to generate in the context length 64"):
        proc.process(req([1] * CONTEXT, max_tokens=None))


@pytest.mark.parametrize("prompt, raw", [([], False), ("", True)])
def test_empty_prompt_is_refused(proc, prompt, raw):
    """No token ids, or text that encodes to nothing: InvalidRequestError saying the prompt is empty."""
    with pytest.raises(InvalidRequestError, match="prompt is empty"):
        proc.process(req(prompt, raw=raw))


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 80, -1])
def test_token_id_outside_the_vocabulary_is_refused_with_the_numbers(proc, bad):
    """The first id outside [0, vocab_size) and the vocabulary size are named."""
    with pytest.raises(InvalidRequestError) as err:
        proc.process(req([3, bad, 4]))
    assert str(err.value) == f"token id {bad} is outside the vocabulary (size {VOCAB})"


def test_text_encoding_beyond_the_model_vocabulary_is_refused(tok):
    """A tokenizer larger than the model's vocabulary: encoded text is checked against the model's size."""
    ids = tok.encode("The", add_special_tokens=False)
    assert max(ids) >= 100  # 'he' is a merged token, past the first 100 ids
    with pytest.raises(InvalidRequestError, match=rf"token id {max(i for i in ids if i >= 100)} is outside the vocabulary \(size 100\)"):
        InputProcessor(tok, vocab_size=100, max_model_len=CONTEXT).process(req("The", raw=True))


# -- OutputStream.add ----------------------------------------------------------------------------
def feed(stream, ids, last_reason=None):
    """Add ids one by one, the scheduler's finish reason on the last one only; the outputs in order."""
    return [stream.add(t, last_reason if i == len(ids) - 1 else None, None, None) for i, t in enumerate(ids)]


def test_stop_string_finishes_with_stop_and_text_cut_before_it(tok):
    """A stop string in the decoded text ends the request: finish_reason "stop", text up to the stop string."""
    prompt = tok.encode("Q: ")
    ids = tok.encode("Paris is the capital of France.")
    stream = OutputStream(tok, "r1", prompt, SamplingParams(stop=("capital",)))
    outs = []
    for t in ids:
        outs.append(stream.add(t, None, None, None))
        if outs[-1].finished:
            break
    assert tok.decode([ids[len(outs) - 1]]) == " capital"  # it stopped on the token that completed the string
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert outs[-1].finish_reason == "stop"
    assert stream.hit_stop_string
    assert "".join(o.text for o in outs) == "Paris is the "
    assert all(o.finish_reason is None for o in outs[:-1])


def test_stop_string_wins_over_the_schedulers_reason(tok):
    """When the stop string and e.g. max_tokens land on the same token, the reason is "stop"."""
    ids = tok.encode("Paris is the capital")
    stream = OutputStream(tok, "r", [1], SamplingParams(stop=("capital",)))
    outs = feed(stream, ids, last_reason="length")
    assert outs[-1].finish_reason == "stop" and stream.hit_stop_string
    assert "".join(o.text for o in outs) == "Paris is the "


def test_no_stop_string_hit_leaves_hit_stop_string_false(tok):
    """Text that never contains the stop string: no early finish, hit_stop_string stays false."""
    ids = tok.encode("Paris is the capital of France.")
    stream = OutputStream(tok, "r", [1], SamplingParams(stop=("Berlin",)))
    outs = feed(stream, ids)
    assert not any(o.finished for o in outs)
    assert not stream.hit_stop_string


def test_scheduler_finish_reason_passes_through_and_flushes_held_back_text(tok):
    """Text that may begin a stop string is held back; a "length" finish releases it with the last delta."""
    text = "Paris is the capital of France"
    ids = tok.encode(text)
    stream = OutputStream(tok, "r", [1], SamplingParams(stop=("of France!",)))
    outs = feed(stream, ids[:-1])
    so_far = "".join(o.text for o in outs)
    assert so_far == "Paris is the capital "  # "of Fran" could begin "of France!": held back
    last = stream.add(ids[-1], "length", None, None)
    assert last.finished and last.finish_reason == "length"
    assert last.text == "of France"
    assert so_far + last.text == text
    assert not stream.hit_stop_string


def test_length_without_stop_strings_finishes_the_stream(tok):
    """Without stop strings every token's text comes out at once, and "length" marks the last delta finished."""
    ids = tok.encode("The quick brown fox")
    stream = OutputStream(tok, "r", [1], SamplingParams())
    outs = feed(stream, ids, last_reason="length")
    assert [o.text for o in outs] == [tok.decode([t]) for t in ids]
    assert [o.finished for o in outs] == [False] * (len(ids) - 1) + [True]
    assert outs[-1].finish_reason == "length"


def test_multibyte_character_is_held_until_complete(tok):
    """A character split over several tokens comes out whole, never as U+FFFD pieces."""
    ids = tok.encode("🙂")
    assert len(ids) > 1
    stream = OutputStream(tok, "r", [1], SamplingParams())
    outs = feed(stream, ids)
    assert [o.text for o in outs] == [""] * (len(ids) - 1) + ["🙂"]


def test_logprobs_carry_the_token_text_and_the_top_tokens_text(tok):
    """A logprob becomes a TokenLogprob with the chosen token's text and each top token's text."""
    the, capital, of = tok.encode(" the capital of")
    stream = OutputStream(tok, "r", [1], SamplingParams(logprobs=2))
    out = stream.add(capital, None, -0.25, [(capital, -0.25), (of, -2.5)])
    assert out.logprobs == [TokenLogprob(capital, " capital", -0.25, [(" capital", -0.25), (" of", -2.5)])]
    out = stream.add(the, None, -1.0, [])
    assert out.logprobs == [TokenLogprob(the, " the", -1.0, [])]
    assert stream.add(of, None, None, None).logprobs is None  # no logprob asked: none given


def test_outputs_count_completion_tokens_and_carry_the_request(tok):
    """Each delta carries its one token, the request id, the prompt size and the running completion count."""
    prompt = tok.encode("Q: hi")
    ids = tok.encode("The quick")
    stream = OutputStream(tok, "req-7", prompt, SamplingParams())
    outs = feed(stream, ids)
    assert [o.completion_tokens for o in outs] == list(range(1, len(ids) + 1))
    assert [o.token_ids for o in outs] == [[t] for t in ids]
    assert {(o.request_id, o.prompt_tokens) for o in outs} == {("req-7", len(prompt))}
    assert stream.completion_tokens == len(ids)


def test_text_too_long_for_any_tokenization_is_refused_without_tokenizing(proc, tok, monkeypatch):
    """Megabytes of text take seconds to tokenize: a bound from the longest token's bytes refuses them first."""
    calls = []
    monkeypatch.setattr(tok, "encode", lambda *a, **k: calls.append(1) or [1])
    longest = max(len(t.encode()) for t in tok.batch_decode([[i] for i in range(len(tok))]))
    with pytest.raises(InvalidRequestError, match="too long"):
        proc.process(req("x" * (longest * CONTEXT + 1), raw=True))
    with pytest.raises(InvalidRequestError, match="too long"):
        proc.process(req([{"role": "user", "content": "y" * (longest * CONTEXT + 1)}]))
    assert calls == []
    proc.process(req("x" * CONTEXT, raw=True, max_tokens=1))  # within the bound: tokenized as usual
    assert calls == [1]
