"""The rest of the OpenAI request surface, over HTTP with the official openai client: n choices (their
prompt computed once), batched and token-id completions, echo, cached_tokens, /v1/models/{id}, and
fields the server does not support refused by name."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.deployments.served_app import API_KEY, AUTH, PROMPT

LONG = "The lighthouse keeper counted the ships that passed the rocks each night. " * 8  # several KV blocks


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.http}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _greedy(client, prompt, **kw) -> str:
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, **kw).choices[0].text


def _cache_hits() -> float:
    """Prompt tokens served from the prefix cache so far, over all replicas, once the count stands still."""
    from tests.deployments.test_metrics import scrape

    deadline, last = time.monotonic() + 30, None
    while True:
        now = scrape().get("ray_vllm_prefix_cache_hits_total", 0.0)
        if now == last or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(2.5)  # longer than a replica's metrics period


def test_n_choices_share_one_prompt_computation(client):
    ask = dict(model="tiny", messages=[{"role": "user", "content": LONG}], n=4, max_tokens=6, temperature=1.0, seed=11,
               extra_body={"ignore_eos": True})  # fmt: skip
    hits_before = _cache_hits()
    out = client.chat.completions.create(**ask)
    # Choices 1..3 found the prompt's full blocks in the prefix cache rather than computing them.
    assert _cache_hits() - hits_before >= 3 * (out.usage.prompt_tokens // 16 * 16)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    texts = [c.message.content for c in out.choices]
    assert len(set(texts)) > 1  # seeds 11, 12, 13, 14: different draws
    assert [c.message.content for c in client.chat.completions.create(**ask).choices] == texts  # the same draws again
    # The prompt counts once in usage; every choice's tokens count.
    one = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": LONG}], max_tokens=1)
    assert out.usage.prompt_tokens == one.usage.prompt_tokens
    assert out.usage.completion_tokens == 4 * 6


def test_n_streamed_tags_each_choice(client):
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, n=3, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))  # fmt: skip
    texts = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    greedy = _greedy(client, PROMPT, extra_body={"ignore_eos": True})
    assert texts == {0: greedy[: len(texts[0])], 1: texts[0], 2: texts[0]} and texts[0]
    assert chunks[-1].usage.completion_tokens == 15


def test_batched_and_token_id_prompts_answer_as_alone(client):
    prompts = [PROMPT, "Paris is the capital of", "Numbers: 1 2 3"]
    batched = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in batched.choices] == [0, 1, 2]
    assert [c.text for c in batched.choices] == [_greedy(client, p) for p in prompts]
    ids = httpx.post(client.base_url.join("completions").__str__(), headers=AUTH, timeout=60,
                     json={"model": "tiny", "prompt": [[5, 6, 7], [8, 9]], "max_tokens": 3, "temperature": 0}).json()  # fmt: skip
    assert len(ids["choices"]) == 2 and ids["usage"]["prompt_tokens"] == 5


def test_echo_puts_the_prompt_first(client):
    echoed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, echo=True).choices[0].text
    assert echoed == PROMPT + _greedy(client, PROMPT)
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == echoed
    with pytest.raises(openai.BadRequestError, match="echo with logprobs"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, echo=True, logprobs=1)


def test_cached_tokens_report_the_prefix_cache(client):
    first = client.completions.create(model="tiny", prompt=LONG + " first", max_tokens=1)
    second = client.completions.create(model="tiny", prompt=LONG + " second", max_tokens=1)
    # The served app routes by prefix, so the second lands where the first left its blocks.
    assert first.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens_details.cached_tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= 16 * ((second.usage.prompt_tokens - 8) // 16)


def test_model_by_id(client, served):
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other/model")
    assert httpx.get(served.http + "/v1/models/tiny", timeout=10).status_code == 401  # the key is required here too


@pytest.mark.parametrize("field,value", [("suffix", "x"), ("functions", []), ("best_of", 2), ("frobnicate", 1)])
def test_unsupported_fields_are_refused_by_name(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, extra_body={field: value})
    assert e.value.body["param"] == field and "does not support" in e.value.message


def test_no_op_fields_are_accepted(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                         user="u1", metadata={"k": "v"}, store=False, n=1)  # fmt: skip
    assert out.choices[0].message.content is not None
