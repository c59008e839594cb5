"""Tool-call formats: parsing recorded model outputs (whole and streamed in pieces), forced calls from a
tiny model through each format's grammar, and the chat as templates get it (round trip of calls and
results). No Ray: formats, grammars and an in-process engine."""

from __future__ import annotations

import asyncio
import json
import random

import jsonschema
import pytest

from cluster.config import EngineConfig
from cluster.engine import LLMEngine
from cluster.protocol import GenerateRequest
from deployments.tools import FORMATS, ToolCallStream, ToolSetup, pick_format, template_takes_tools
from model.sampling_params import SamplingParams
from model.tokenizer import encode_prompt, load_tokenizer
from tests.reference import close

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
    "required": ["zone"], "additionalProperties": False}}}  # fmt: skip
TOOLS = [WEATHER, CLOCK]

# What models of each family write (one call, two calls, text before the calls).
RECORDED = {
    "hermes": [
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>', None,
         [("get_weather", {"city": "Paris", "unit": "c"})]),
        ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "f"}}\n</tool_call>\n'
         '<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call>', "Let me check.",
         [("get_weather", {"city": "Oslo", "unit": "f"}), ("get_time", {"zone": 1})]),
    ],
    "llama3_json": [
        ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', None,
         [("get_weather", {"city": "Paris", "unit": "c"})]),
        ('<|python_tag|>{"name": "get_time", "parameters": {"zone": -3}}; {"name": "get_time", "parameters": {"zone": 9}}',
         None, [("get_time", {"zone": -3}), ("get_time", {"zone": 9})]),
    ],
    "mistral": [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome", "unit": "c"}}]', None,
         [("get_weather", {"city": "Rome", "unit": "c"})]),
        ('[{"name": "get_time", "arguments": {"zone": 2}}, {"name": "get_weather", "arguments": {"city": "Lima", "unit": "f"}}]',
         None, [("get_time", {"zone": 2}), ("get_weather", {"city": "Lima", "unit": "f"})]),
    ],
}  # fmt: skip
NOT_CALLS = ["Paris is sunny today.", "Use {braces} and <tags> freely.", "<tool_call> is how I would call a tool.", ""]


def _calls(calls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def _stream(fmt, text: str, seed: int) -> tuple[str, list[tuple[str, dict]]]:
    """The text fed in random pieces, as deltas arrive; (all content sent, the calls a client
    assembles from the fragments: names and arguments concatenated per index)."""
    stream, rng, sent, i = ToolCallStream(fmt), random.Random(seed), "", 0
    calls: dict[int, dict] = {}

    def take(content: str, fragments: list[dict]) -> None:
        nonlocal sent
        sent += content
        for f in fragments:
            call = calls.setdefault(f["index"], {"id": None, "name": "", "arguments": ""})
            if "id" in f:
                assert call["id"] is None, "a call is announced once"
                call["id"] = f["id"]
            call["name"] += f["function"].get("name", "")
            call["arguments"] += f["function"].get("arguments", "")

    while i < len(text):
        n = rng.randint(1, 7)
        take(*stream.feed(text[i : i + n]))
        i += n
    take(*stream.finish())
    assert all(c["id"] for c in calls.values())
    return sent, [(calls[k]["name"], json.loads(calls[k]["arguments"])) for k in sorted(calls)]


@pytest.mark.parametrize("name", list(RECORDED))
def test_recorded_outputs_parse_whole_and_streamed(name):
    fmt = FORMATS[name]
    for text, content, calls in RECORDED[name]:
        got_content, got_calls = fmt.parse(text)
        assert (got_content, _calls(got_calls)) == (content, calls)
        for seed in range(5):
            streamed, streamed_calls = _stream(fmt, text, seed)
            assert streamed_calls == calls
            assert streamed.strip() == (content or "")
    for text in NOT_CALLS:  # plain answers stay plain, streamed or not
        assert fmt.parse(text) == (text, [])
        assert _stream(fmt, text, 0) == (text, [])


def test_format_from_config_or_template():
    assert pick_format("mistral", None).name == "mistral"
    assert pick_format("auto", "{{ '<tool_call>' }}").name == "hermes"
    assert pick_format("auto", "[TOOL_CALLS] {{ x }}").name == "mistral"
    assert pick_format("auto", "<|python_tag|>").name == "llama3_json"
    assert pick_format("auto", "{{ messages }}").name == "hermes"


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64, worker_process="in_process"))
    yield engine
    close(engine)


async def _text(engine, params: SamplingParams) -> tuple[str, str]:
    text, reason = "", None
    async for out in engine.generate(GenerateRequest("call a tool", params, raw=True)):
        text, reason = text + out.text, out.finish_reason
    return text, reason


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("parallel", [False, True])
def test_forced_calls_from_a_model_that_knows_no_tools_parse_and_validate(engine, name, parallel):
    fmt = FORMATS[name]
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}

    async def main():
        runs = []
        for tools in (TOOLS, [CLOCK]):  # 'required' over both, and a named function
            grammar = fmt.grammar(tools, parallel)
            params = [SamplingParams(max_tokens=200, temperature=t, seed=s, lark_grammar=grammar) for t, s in ((0, None), (1.0, 3))]
            runs += [(tools, r) for r in await asyncio.gather(*(_text(engine, p) for p in params))]
        return runs

    finished = 0
    for tools, (text, reason) in asyncio.run(main()):
        if reason == "length":  # parallel calls may go on until max_tokens
            assert parallel, text
            continue
        finished += 1
        content, calls = fmt.parse(text)
        assert calls and content is None, text
        assert parallel or len(calls) == 1
        for call in calls:
            assert call.name in {t["function"]["name"] for t in tools}
            jsonschema.validate(json.loads(call.arguments), by_name[call.name])
    assert finished >= 2


TOOL_TEMPLATE = (  # a template that takes tools, writing calls and results the hermes way
    "{% if tools %}tools: {% for t in tools %}{{ t['function']['name'] }} {% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}<tool_call>{{ c['function']['name'] }} {{ c['function']['arguments'] | tojson }}</tool_call>{% endfor %}"
    "{% if m.get('tool_call_id') %} (for {{ m['tool_call_id'] }}){% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)  # fmt: skip
CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_1"},
]  # fmt: skip


def test_a_template_that_takes_tools_gets_them_and_the_calls_as_objects(tiny_llama_dir, tmp_path):
    tok = load_tokenizer(tiny_llama_dir)
    tok.chat_template = TOOL_TEMPLATE
    setup = ToolSetup.for_tokenizer("auto", tok)
    assert setup.template_takes_tools and setup.format.name == "hermes"
    messages, tools = setup.messages(CHAT, TOOLS)
    assert tools == TOOLS
    text = tok.decode(encode_prompt(tok, messages, tools=tools))
    assert "tools: get_weather get_time" in text
    assert '<tool_call>get_weather {"city": "Paris", "unit": "c"}</tool_call>' in text  # arguments as an object
    assert "tool: 18 C, sunny (for call_1)" in text


def test_a_template_without_tools_gets_them_as_text_in_the_format(tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)  # its template knows nothing of tools
    assert not template_takes_tools(tok)
    setup = ToolSetup.for_tokenizer("auto", tok)
    messages, tools = setup.messages(CHAT, TOOLS)
    assert tools is None
    text = tok.decode(encode_prompt(tok, messages))
    assert text.startswith("system: These functions are available")
    assert '"name": "get_weather"' in text and '"name": "get_time"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>' in text
    assert "tool: 18 C, sunny" in text
