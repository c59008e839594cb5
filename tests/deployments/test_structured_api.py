"""response_format through the served app: the official openai client over HTTP (streaming and not),
and gRPC; a schema the grammar cannot take is a 400 and the replica keeps serving."""

from __future__ import annotations

import json

import grpc
import jsonschema
import openai
import pytest

from deployments.proto import shardserve_pb2 as pb
from deployments.proto import shardserve_pb2_grpc as pb_grpc
from tests.deployments.served_app import API_KEY

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
                   "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
    "required": ["name", "age", "pets"], "additionalProperties": False,
}  # fmt: skip
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
MESSAGES = [{"role": "user", "content": "A person, as JSON."}]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.http}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(client, stream, temperature):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=120, temperature=temperature, seed=7,
              response_format=SCHEMA_FORMAT)  # fmt: skip
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        choice = client.chat.completions.create(**kw).choices[0]
        text, reason = choice.message.content, choice.finish_reason
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_and_completions(client):
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=120, temperature=0,
                                          response_format={"type": "json_object"})  # fmt: skip
    assert isinstance(json.loads(chat.choices[0].message.content), dict)
    done = client.completions.create(model="tiny", prompt="JSON:", max_tokens=120, temperature=0,
                                     extra_body={"response_format": SCHEMA_FORMAT})  # fmt: skip
    jsonschema.validate(json.loads(done.choices[0].text), PERSON)


def test_unusable_schemas_are_400s_naming_the_problem(client):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, response_format=bad)
    assert "response_format schema" in e.value.message and "unclosed group" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8,
                                       response_format={"type": "json_schema"})  # fmt: skip
    assert e.value.body["param"] == "response_format"
    ok = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, temperature=0)
    assert ok.choices[0].message.content is not None  # the replica serves on


def test_grpc_takes_the_response_format_as_json(served):
    with grpc.insecure_channel(served.grpc) as channel:
        stub = pb_grpc.ShardServeStub(channel)
        auth = (("authorization", f"Bearer {API_KEY}"),)
        request = pb.GenerateRequest(model="tiny", messages=[pb.ChatMessage(role="user", content="A person.")],
                                     max_tokens=120, temperature=0, response_format=json.dumps(SCHEMA_FORMAT))  # fmt: skip
        reply = stub.Generate(request, metadata=auth, timeout=120)
        assert reply.finish_reason == "stop"
        jsonschema.validate(json.loads(reply.text), PERSON)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(pb.GenerateRequest(model="tiny", prompt="x", response_format="{nope"), metadata=auth, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
