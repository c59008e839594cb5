"""The gRPC API through Ray Serve's gRPC proxy, with a real grpcio client, next to the HTTP API."""

from __future__ import annotations

import grpc
import httpx
import pytest

from deployments.proto import shardserve_pb2 as pb
from deployments.proto import shardserve_pb2_grpc as pb_grpc
from tests.deployments.served_app import API_KEY, PROMPT

AUTH = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture(scope="module")
def stub(served):
    with grpc.insecure_channel(served.grpc) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        yield pb_grpc.ShardServeStub(channel)


def greedy(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"model": "tiny", "max_tokens": 8, "temperature": 0, "ignore_eos": True, **fields})


def http_post(served, path: str, body: dict) -> dict:
    r = httpx.post(served.http + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    r.raise_for_status()
    return r.json()


def test_unary_and_streaming_give_the_tokens_http_gives(served, stub, reference_text):
    unary = stub.Generate(greedy(prompt=PROMPT, logprobs=2), metadata=AUTH, timeout=120)
    http = http_post(
        served,
        "/v1/completions",
        {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 2},
    )
    assert unary.text == http["choices"][0]["text"] == reference_text
    assert len(unary.token_ids) == 8
    assert unary.finish_reason == "length"
    assert (unary.usage.completion_tokens, unary.usage.total_tokens) == (8, http["usage"]["total_tokens"])
    assert [lp.token for lp in unary.logprobs] == http["choices"][0]["logprobs"]["tokens"]
    assert [lp.logprob for lp in unary.logprobs] == pytest.approx(http["choices"][0]["logprobs"]["token_logprobs"])
    assert all(len(lp.top_logprobs) == 2 for lp in unary.logprobs)

    chunks = list(stub.GenerateStream(greedy(prompt=PROMPT), metadata=AUTH, timeout=120))
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert len({c.id for c in chunks}) == 1
    assert [c.finish_reason for c in chunks] == [""] * (len(chunks) - 1) + ["length"]
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_messages_match_http_chat(served, stub):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris is the capital of"}]
    unary = stub.Generate(greedy(messages=[pb.ChatMessage(**m) for m in messages]), metadata=AUTH, timeout=120)
    http = http_post(
        served,
        "/v1/chat/completions",
        {"model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True},
    )
    assert unary.text == http["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "request_,metadata,code",
    [
        (greedy(prompt="hi"), (), grpc.StatusCode.UNAUTHENTICATED),
        (greedy(prompt="hi"), (("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
        (pb.GenerateRequest(model="nope", prompt="hi"), AUTH, grpc.StatusCode.NOT_FOUND),
        (greedy(prompt="hi", temperature=-1), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(model="tiny"), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
        (greedy(prompt="hi", messages=[pb.ChatMessage(role="user", content="x")]), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
        (pb.GenerateRequest(prompt="hi", max_tokens=100000), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
        (greedy(messages=[pb.ChatMessage(role="robot", content="x")]), AUTH, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_refusals_map_to_grpc_status_codes_for_unary_and_streaming(stub, request_, metadata, code):
    for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
        with pytest.raises(grpc.RpcError) as err:
            call(request_, metadata=metadata, timeout=120)
        assert err.value.code() == code, err.value.details()
        assert err.value.details()
    assert stub.Generate(greedy(prompt="hi"), metadata=AUTH, timeout=120).finish_reason  # still serving


def test_list_models_and_health(stub):
    assert [m.id for m in stub.ListModels(pb.ListModelsRequest(), metadata=AUTH, timeout=60).models] == ["tiny"]
    assert stub.Health(pb.HealthRequest(), timeout=60).status == "ok"
    with pytest.raises(grpc.RpcError) as err:
        stub.ListModels(pb.ListModelsRequest(), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_committed_grpc_modules_are_what_make_proto_generates(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    proto = Path("deployments/proto/shardserve.proto")
    (tmp_path / proto.parent).mkdir(parents=True)
    shutil.copy(repo / proto, tmp_path / proto)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--grpc_python_out=.", str(proto)]
    subprocess.run(cmd, cwd=tmp_path, check=True)
    for name in ("shardserve_pb2.py", "shardserve_pb2_grpc.py"):
        assert (tmp_path / proto.parent / name).read_text() == (repo / proto.parent / name).read_text(), name
