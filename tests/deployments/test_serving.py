"""The served app end to end: real Ray, real serve.run, real HTTP on loopback, the official openai client."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.deployments.served_app import API_KEY, PROMPT


@pytest.fixture(scope="module")
def base_url(served):
    return served.http


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


GREEDY = {"temperature": 0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_greedy_equals_transformers_streamed_or_not(client, reference_text):
    full = client.completions.create(model="tiny", prompt=PROMPT, **GREEDY)
    assert full.choices[0].text == reference_text
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 8
    stream = client.completions.create(model="tiny", prompt=PROMPT, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in stream) == reference_text


def test_chat_streaming_equals_non_streaming_and_reports_usage(client):
    messages = [{"role": "user", "content": "Paris is the capital of"}]
    full = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8 == full.usage.completion_tokens


def test_concurrent_streams_equal_their_sequential_results_and_use_both_replicas(base_url, client):
    prompts = [f"{PROMPT} {i}" * (1 + i % 3) for i in range(16)]
    sequential = [client.completions.create(model="tiny", prompt=p, **GREEDY).choices[0].text for p in prompts]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

        async def one(p):
            raw = await aclient.completions.with_raw_response.create(model="tiny", prompt=p, stream=True, **GREEDY)
            text = "".join([c.choices[0].text async for c in raw.parse() if c.choices])
            return text, raw.headers["x-shardserve-replica"]

        return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(main())
    assert [t for t, _ in results] == sequential
    assert len({replica for _, replica in results}) == 2


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 100000}, 400, None),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model"),
        ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
        ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ],
)
def test_errors_have_openai_bodies_and_the_server_keeps_serving(base_url, client, path, body, status, param):
    r = httpx.post(base_url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].finish_reason


DEEP = "[" * 10_000 + "]" * 10_000
RAW_BAD_INPUTS = [
    # (method, path, raw body, status, error type): bodies no JSON library would send, and framework errors
    ("POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
     400, "invalid_request_error"),
    ("POST", "/v1/completions", DEEP.encode(), 400, "invalid_request_error"),
    ("POST", "/v1/completions", ('{"model": "tiny", "prompt": "hi", "extra": ' + DEEP + "}").encode(),
     400, "invalid_request_error"),
    ("POST", "/v1/completions", b"[1, 2]", 400, "invalid_request_error"),
    ("POST", "/v1/completions", b'{"model": "tiny", "prompt": ', 400, "invalid_request_error"),
    ("POST", "/v1/completions", b'{"model": "tiny", "prompt": "' + b"a" * (5 << 20) + b'"}',
     413, "invalid_request_error"),
    ("POST", "/v1/no-such-route", b"{}", 404, "not_found"),
    ("GET", "/v1/chat/completions", b"", 405, "invalid_request_error"),
    ("DELETE", "/v1/models", b"", 405, "invalid_request_error"),
]  # fmt: skip


@pytest.mark.parametrize("method,path,raw,status,kind", RAW_BAD_INPUTS,
                         ids=["invalid-utf8", "deep-top", "deep-field", "not-object", "truncated", "too-large",
                              "unknown-path", "wrong-method", "wrong-method-models"])  # fmt: skip
def test_bad_bodies_and_framework_errors_get_openai_bodies(base_url, client, reference_text, method, path, raw,
                                                           status, kind):  # fmt: skip
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    r = httpx.request(method, base_url + path, content=raw, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == kind
    assert "detail" not in r.json()
    # and the server still gives the same greedy answer
    assert client.completions.create(model="tiny", prompt=PROMPT, **GREEDY).choices[0].text == reference_text


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(base_url):
    body = {"model": "tiny", "prompt": "word " * 600_000, "max_tokens": 1}  # 3 MB: under the body limit
    r = httpx.post(base_url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 400
    assert "too long" in r.json()["error"]["message"]


def test_error_bodies_carry_no_internals_and_name_the_request(base_url):
    r = httpx.post(base_url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 100000},
                   headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    assert r.status_code == 400 and r.headers["x-request-id"]
    for leak in ("\x1b[", "Actor", "pid=", "Traceback", "/work", "ray."):
        assert leak not in r.text


def test_health_says_serving(base_url):
    r = httpx.get(base_url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "serving"}


def test_missing_or_wrong_api_key_is_401(base_url):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"


def test_openapi_describes_request_and_response_bodies_and_real_answers_fit_them(base_url):
    """The schema names every body, and the bodies served fit the declared models exactly (extra
    fields refused), streamed chunks and errors included."""
    import json as json_

    from deployments import openai_schema as oas

    schema = httpx.get(base_url + "/openapi.json").json()
    for path, required in (("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")):
        post = schema["paths"][path]["post"]
        ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        body = schema["components"]["schemas"][ref.rsplit("/", 1)[1]]
        assert required in body["required"] and "max_tokens" in body["properties"]
        assert {"200", "400", "429", "503"} <= set(post["responses"])
        assert "text/event-stream" in post["responses"]["200"]["content"]

    auth = {"Authorization": f"Bearer {API_KEY}"}

    def post(path, body):
        return httpx.post(base_url + path, json=body, headers=auth, timeout=60)

    def chunks(path, body):
        with httpx.stream("POST", base_url + path, json={**body, "stream": True}, headers=auth, timeout=60) as r:
            data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        return [json_.loads(d) for d in data[:-1]]

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}}  # fmt: skip
    oas.ChatCompletion.model_validate(post("/v1/chat/completions", chat).json())
    for c in chunks("/v1/chat/completions", chat):
        oas.ChatCompletionChunk.model_validate(c)
    completion = {"model": "tiny", "prompt": "hi", "max_tokens": 4, "logprobs": 1,
                  "stream_options": {"include_usage": True}}  # fmt: skip
    oas.Completion.model_validate(post("/v1/completions", completion).json())
    for c in chunks("/v1/completions", completion):
        oas.Completion.model_validate(c)
    oas.ErrorResponse.model_validate(post("/v1/completions", {"model": "tiny"}).json())
    oas.ModelList.model_validate(httpx.get(base_url + "/v1/models", headers=auth).json())
    oas.Health.model_validate(httpx.get(base_url + "/health").json())
