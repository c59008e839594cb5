"""Tool calling through the served app with the official openai client: forced calls ('required', a
named function) come back as valid tool_calls, streamed and not; a call and its result go back in;
'auto' and 'none' leave plain answers alone; bad tool requests are 400s."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.deployments.served_app import API_KEY
from tests.deployments.test_tools import CLOCK, TOOLS, WEATHER

ASK = [{"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]}]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.http}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _streamed(client, **kw):
    """(content, tool_calls as dicts, finish_reason) accumulated from the chunks, as clients do."""
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = tc.id or call["id"]
            call["name"] += (tc.function.name or "") if tc.function else ""
            call["arguments"] += (tc.function.arguments or "") if tc.function else ""
        reason = chunk.choices[0].finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("choice", ["required", "named"])
def test_forced_calls_are_valid_tool_calls(client, stream, choice):
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "get_time"}}
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False,
              max_tokens=200, temperature=0)  # fmt: skip
    if stream:
        content, calls, reason = _streamed(client, **kw)
    else:
        choice_ = client.chat.completions.create(**kw).choices[0]
        content, reason = choice_.message.content, choice_.finish_reason
        calls = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in choice_.message.tool_calls]
    assert reason == "tool_calls" and not content
    assert len(calls) == 1 and calls[0]["id"].startswith("call_")
    assert choice == "required" or calls[0]["name"] == "get_time"
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMS[calls[0]["name"]])


def test_a_call_and_its_result_go_back_in(client):
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=200, temperature=0)  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]  # fmt: skip
    question = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=1, temperature=0)
    plain = client.chat.completions.create(model="tiny", messages=history, max_tokens=8, temperature=0)
    with_tools = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=8, temperature=0)
    assert plain.choices[0].finish_reason in ("stop", "length")
    # The call (its name and arguments) and the result are in the prompt, at a token or more a word.
    words = len(f"{call.function.name} {call.function.arguments} 18 C and sunny".split())
    assert plain.usage.prompt_tokens > question.usage.prompt_tokens + words
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens  # the tools are described to the model


def test_auto_and_none_leave_plain_answers_alone(client):
    base = dict(model="tiny", messages=ASK, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**base).choices[0]
    none = client.chat.completions.create(tools=TOOLS, tool_choice="none", **base).choices[0]
    auto = client.chat.completions.create(tools=TOOLS, **base).choices[0]  # this model writes no calls
    assert none.message.content == plain.message.content
    assert auto.message.tool_calls is None and auto.finish_reason == "length"


@pytest.mark.parametrize("body,says", [
    ({"tools": [CLOCK], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "not among tools"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [CLOCK], "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot both"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "'image_url' is not supported"),
    ({"messages": [{"role": "user", "content": None}]}, "content is required"),
])  # fmt: skip
def test_bad_tool_requests_are_400s(client, body, says):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": "tiny", "messages": ASK, "max_tokens": 4, **body})
    assert says in e.value.message


def test_tool_call_bodies_match_the_published_schema(served):
    import httpx

    from deployments import openai_schema as oas

    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
            "max_tokens": 200, "temperature": 0}  # fmt: skip
    auth = {"Authorization": f"Bearer {API_KEY}"}
    whole = httpx.post(served.http + "/v1/chat/completions", json=body, headers=auth, timeout=120).json()
    assert oas.ChatCompletion.model_validate(whole).choices[0].message.tool_calls
    with httpx.stream("POST", served.http + "/v1/chat/completions", json={**body, "stream": True}, headers=auth, timeout=120) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [oas.ChatCompletionChunk.model_validate_json(line) for line in lines[:-1]]
    fragments = [f for c in chunks if c.choices for f in c.choices[0].delta.tool_calls or []]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert fragments[0].function.name and len(fragments) > 2  # the name, then the arguments in pieces
