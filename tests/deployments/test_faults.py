"""Faults a client meets on a real app: a worker of a replica's TP gang killed or stopped mid-stream,
and a burst past a replica's capacity. Their own apps on the session's Serve, each one replica of
the tiny Llama on a TP=2 gang, so a worker can fail while its replica lives on: "faults" (under
/faults) resumes requests on a new gang; "faults0" (/faults0) has max_migrations=0, so its
requests fail, as every request does past its migrations. "failover" (2 replicas, PP=2) and
"failover1" (1 replica, TP=2, max_migrations=1) run with replica_failover: the Relay in front,
and a replica's own process is killed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import psutil
import pytest

from tests.deployments.served_app import API_KEY, AUTH

LONG = {"model": "faulty", "prompt": "The quick brown fox", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


def start_app(served, model_dir, name: str, **overrides) -> str:
    from ray import serve

    from deployments.app import build_app
    from deployments.config import parse_app_config

    config = parse_app_config({
        "model": str(model_dir), "served_model_name": "faulty", "num_replicas": 1, "tensor_parallel_size": 2,
        "cpus_per_worker": 0.25, "num_kv_blocks": 256, "max_num_seqs": 4, "max_queued_requests": 2,
        "step_timeout_s": 1.0, "api_key": API_KEY, **overrides,
    })  # fmt: skip
    OTHER_WORKERS.clear()
    OTHER_WORKERS.update(all_worker_pids())
    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    return f"{served.http}/{name}"


@pytest.fixture(scope="module")
def faults_url(served, tiny_llama_dir):
    from ray import serve

    yield start_app(served, tiny_llama_dir, "faults")
    serve.delete("faults")


@pytest.fixture
def no_migration_url(served, tiny_llama_dir, faults_url):
    from ray import serve

    serve.delete("faults")  # one gang at a time, so the worker to break is the only one
    yield start_app(served, tiny_llama_dir, "faults0", max_migrations=0)
    serve.delete("faults0")
    start_app(served, tiny_llama_dir, "faults")


def all_worker_pids() -> set[int]:
    return {p.pid for p in psutil.process_iter(["cmdline"]) if (p.info["cmdline"] or [""])[0].startswith("ray::Worker")}


OTHER_WORKERS: set[int] = set()  # the shared app's workers, found before a faults app starts


def gang_worker_pids() -> list[int]:
    """The faults app's Worker actors: every Worker process but the shared app's (one gang at a time
    runs here: the two faults apps never run together)."""
    return sorted(all_worker_pids() - OTHER_WORKERS)


def wait_healthy(url: str, timeout_s: float = 120) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200 and gang_worker_pids():
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not become healthy in {timeout_s} s")


async def stream_events(client: httpx.AsyncClient, url: str, started: asyncio.Event, body: dict | None = None,
                        replicas: list | None = None) -> list:  # fmt: skip
    """Every SSE data payload of one streamed completion (parsed JSON, or the literal [DONE]); the
    replica that answered is appended to `replicas`."""
    events = []
    async with client.stream("POST", url + "/v1/completions", json=body or {**LONG, "stream": True}, headers=AUTH) as r:
        assert r.status_code == 200
        if replicas is not None:
            replicas.append(r.headers["x-shardserve-replica"])
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
                started.set()
    return events


def greedy_text(url: str) -> str:
    body = {**LONG, "max_tokens": 8}
    r = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def break_a_worker_mid_stream(url: str, sig: int) -> tuple[list[list], float]:
    """Two streams; once tokens flow, send `sig` to one worker of the gang. The streams' events and
    how long after the signal they ended."""
    pid = gang_worker_pids()[-1]

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            started = [asyncio.Event(), asyncio.Event()]
            tasks = [asyncio.ensure_future(stream_events(client, url, s)) for s in started]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 60)
            os.kill(pid, sig)
            t0 = time.monotonic()
            events = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            return events, time.monotonic() - t0

    try:
        return asyncio.run(main())
    finally:
        if sig == signal.SIGSTOP:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:  # Serve already replaced the replica and its gang
                pass


def assert_error_event_then_done(events: list) -> None:
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["type"] == "service_unavailable" and "request id" in error["message"]
    assert all("error" not in e for e in events[:-2])  # tokens, then the error: nothing cut in between
    assert not any(e["choices"][0]["finish_reason"] for e in events[:-2])  # not passed off as complete


def text_of(events: list) -> str:
    return "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e.get("choices"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_streams_survive_a_broken_worker_token_for_token(faults_url, sig):
    """Kill (or stop) a worker while two streams run: the replica starts a new gang and the streams
    go on where they were, each ending with the undisturbed greedy text, one finish_reason, [DONE]."""
    wait_healthy(faults_url)
    r = httpx.post(faults_url + "/v1/completions", json=LONG, headers=AUTH, timeout=120)
    want = r.json()["choices"][0]["text"]
    events, ended_after = break_a_worker_mid_stream(faults_url, sig)
    for e in events:
        assert e[-1] == "[DONE]" and all("error" not in x for x in e[:-1])
        assert text_of(e) == want
        assert [x["choices"][0]["finish_reason"] for x in e[:-1]].count("length") == 1
    print(f"{signal.Signals(sig).name}: streams completed {ended_after:.1f} s after the signal")
    assert httpx.get(faults_url + "/health", timeout=10).status_code == 200


def test_past_max_migrations_a_stream_ends_with_an_error_event(no_migration_url):
    """max_migrations=0: the streams end with an OpenAI error event and [DONE], never cut silently;
    /health says 503 until Serve has replaced the replica, and the replacement serves the same text."""
    url = no_migration_url
    wait_healthy(url)
    before = greedy_text(url)
    events, _ = break_a_worker_mid_stream(url, signal.SIGKILL)
    for e in events:
        assert_error_event_then_done(e)
    health = httpx.get(url + "/health", timeout=10)
    if health.status_code != 200:  # until Serve has replaced the replica: 503 and the reason
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_failed"
    recovered_after = wait_healthy(url)
    print(f"replica replaced {recovered_after:.1f} s after the failed streams ended")
    assert greedy_text(url) == before


def test_a_burst_past_capacity_gets_only_200s_and_429s_with_retry_after(faults_url):
    """max_num_seqs 4 and max_queued_requests 2: a burst of 4 is all served; a burst of 12 gets 200s
    and 429s, each 429 with Retry-After; nothing else."""
    wait_healthy(faults_url)

    async def burst(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            body = {**LONG, "max_tokens": 64}
            return await asyncio.gather(*(client.post(faults_url + "/v1/completions", json=body, headers=AUTH)
                                          for _ in range(n)))  # fmt: skip

    assert [r.status_code for r in asyncio.run(burst(4))] == [200] * 4
    responses = asyncio.run(burst(12))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 6, statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["type"] == "rate_limit_error"


# ~250 tokens of JSON from the tiny model, held to it by the grammar: the grammar's state must
# survive the gang's replacement for the answer to stay valid and token-exact.
WORDS = {"type": "array", "items": {"enum": ["sea", "wave", "salt"]}, "minItems": 45, "maxItems": 45}


def test_chat_and_grpc_streams_survive_a_killed_worker(served, faults_url):
    """The same resumption for a structured-output chat stream and a gRPC stream, side by side."""
    import grpc
    import jsonschema

    from deployments.proto import shardserve_pb2 as pb
    from deployments.proto import shardserve_pb2_grpc as pb_grpc

    wait_healthy(faults_url)
    chat = {"model": "faulty", "messages": [{"role": "user", "content": "Tell me about the sea"}], "max_tokens": 400,
            "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WORDS}}}  # fmt: skip
    want_chat = httpx.post(faults_url + "/v1/chat/completions", json=chat, headers=AUTH, timeout=120).json()
    want_chat = want_chat["choices"][0]["message"]["content"]
    metadata = (("authorization", f"Bearer {API_KEY}"), ("application", "faults"))
    request = pb.GenerateRequest(model="faulty", prompt=LONG["prompt"], max_tokens=300, temperature=0, ignore_eos=True)
    with grpc.insecure_channel(served.grpc) as channel:
        stub = pb_grpc.ShardServeStub(channel)
        want_grpc = "".join(m.text for m in stub.GenerateStream(request, metadata=metadata, timeout=120))
        pid = gang_worker_pids()[-1]

        async def main():
            async with httpx.AsyncClient(timeout=120) as client:
                chat_text = ""
                async with client.stream("POST", faults_url + "/v1/chat/completions", json={**chat, "stream": True},
                                         headers=AUTH) as r:  # fmt: skip
                    grpc_stream = stub.GenerateStream(request, metadata=metadata, timeout=120)
                    first = next(grpc_stream)
                    os.kill(pid, signal.SIGKILL)
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            event = json.loads(line[6:])
                            assert "error" not in event
                            chat_text += event["choices"][0]["delta"].get("content") or ""
                grpc_text = first.text + "".join(m.text for m in grpc_stream)
                return chat_text, grpc_text

        chat_text, grpc_text = asyncio.run(main())
    assert chat_text == want_chat
    jsonschema.validate(json.loads(chat_text), WORDS)
    assert grpc_text == want_grpc


# -- replica_failover: the Relay holds the streams, and a replica's own death is survived -----------
@pytest.fixture(scope="module")
def failover_url(served, tiny_llama_dir):
    from ray import serve

    serve.delete("faults")  # one faults app at a time (CPUs, and the worker bookkeeping above)
    url = start_app(served, tiny_llama_dir, "failover", replica_failover=True, num_replicas=2, tensor_parallel_size=1,
                    pipeline_parallel_size=2, max_queued_requests=-1)  # fmt: skip
    yield url
    serve.delete("failover")


def replica_pid(app: str, replica_id: str) -> int:
    """The process of one of the app's LLMServer replicas."""
    import ray

    actor = ray.get_actor(f"SERVE_REPLICA::{app}#LLMServer#{replica_id}", namespace="serve")
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def replica_ids(app: str) -> list[str]:
    """The app's live LLMServer replicas."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#LLMServer#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return [name.removeprefix(prefix) for name in names]


def kill_replica_mid_answer(url: str, app: str, bodies: list[dict]) -> tuple[list, float]:
    """Send the bodies at once (streamed ones read as events); once every stream has tokens, SIGKILL
    the replica serving the first. Each answer (events, or the JSON body), and how long after the
    kill the last ended."""

    async def one(client: httpx.AsyncClient, body: dict, started: asyncio.Event, replica: list):
        if body.get("stream"):
            return await stream_events(client, url, started, body, replica)
        started.set()
        return (await client.post(url + "/v1/completions", json=body, headers=AUTH)).json()

    async def main():
        async with httpx.AsyncClient(timeout=180) as client:
            started, replica = [asyncio.Event() for _ in bodies], []
            tasks = [asyncio.ensure_future(one(client, b, s, replica)) for b, s in zip(bodies, started)]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 60)
            os.kill(replica_pid(app, replica[0]), signal.SIGKILL)
            t0 = time.monotonic()
            answers = await asyncio.wait_for(asyncio.gather(*tasks), 180)
            return answers, time.monotonic() - t0

    return asyncio.run(main())


def test_streams_survive_a_killed_replica_token_for_token(failover_url):
    """replica_failover, 2 replicas of a PP=2 gang: SIGKILL the replica process serving a greedy stream,
    a stream of two seeded choices and a non-streamed request. The streams resume with the tokens
    already sent and end with the undisturbed text, one finish_reason per choice, usage counted once
    and [DONE]; the non-streamed request is answered whole; Serve replaces the replica."""
    wait_healthy(failover_url)
    want = httpx.post(failover_url + "/v1/completions", json=LONG, headers=AUTH, timeout=120).json()["choices"][0]["text"]
    streamed = {**LONG, "stream": True, "stream_options": {"include_usage": True}}
    # Two seeded choices (seeds 5 and 6): each resumes with its own tokens, at its own sampling step.
    two = {**streamed, "n": 2, "temperature": 1.0, "seed": 5}
    want_two = httpx.post(failover_url + "/v1/completions", json={**two, "stream": False}, headers=AUTH,
                          timeout=120).json()["choices"]  # fmt: skip
    answers, ended_after = kill_replica_mid_answer(failover_url, "failover", [streamed, two, LONG])
    for events, n in zip(answers[:2], (1, 2)):
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
        assert [e["choices"][0]["finish_reason"] for e in events[:-2]].count("length") == n
        assert events[-2]["usage"]["completion_tokens"] == n * LONG["max_tokens"]
    assert text_of(answers[0]) == want
    for choice in want_two:
        got = "".join(e["choices"][0]["text"] for e in answers[1][:-2] if e["choices"][0]["index"] == choice["index"])
        assert got == choice["text"]
    assert answers[2]["choices"][0]["text"] == want
    print(f"replica killed: streams completed {ended_after:.1f} s after the kill")
    wait_healthy(failover_url)
    assert httpx.get(failover_url + "/health", timeout=10).json() == {"status": "serving"}


def test_the_relay_answers_as_the_replicas_do(failover_url):
    """Through the Relay, the same answers and OpenAI error bodies as from a replica."""
    wait_healthy(failover_url)
    assert httpx.get(failover_url + "/health", timeout=10).json() == {"status": "serving"}
    assert httpx.get(failover_url + "/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"] == "faulty"
    assert httpx.get(failover_url + "/v1/models/faulty", headers=AUTH, timeout=10).json()["id"] == "faulty"
    post = lambda body, **kw: httpx.post(failover_url + "/v1/completions", content=body, timeout=30, **kw)  # noqa: E731
    refused = {
        "unknown path": httpx.get(failover_url + "/v2/nothing", timeout=10),
        "no key": post(json.dumps(LONG)),
        "not JSON": post(b"{", headers=AUTH),
        "not UTF-8": post(b'{"prompt": "\xff"}', headers=AUTH),
        "too large": post(b" " * (5 << 20), headers=AUTH),
        "unknown model": httpx.get(failover_url + "/v1/models/other", headers=AUTH, timeout=10),
    }
    assert {k: r.status_code for k, r in refused.items()} == {
        "unknown path": 404, "no key": 401, "not JSON": 400, "not UTF-8": 400, "too large": 413, "unknown model": 404}
    for r in refused.values():
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    schema = httpx.get(failover_url + "/openapi.json", timeout=10).json()
    assert "requestBody" in schema["paths"]["/v1/chat/completions"]["post"]


def test_grpc_streams_survive_a_killed_replica(served, failover_url):
    """The same over gRPC: a GenerateStream and a Generate in flight when the replicas are killed (both:
    a gRPC answer does not name its replica) end with the undisturbed text, once Serve has replaced
    them; ListModels and Health answer through the Relay."""
    import grpc

    from deployments.proto import shardserve_pb2 as pb
    from deployments.proto import shardserve_pb2_grpc as pb_grpc

    wait_healthy(failover_url)
    metadata = (("authorization", f"Bearer {API_KEY}"), ("application", "failover"))
    request = pb.GenerateRequest(model="faulty", prompt=LONG["prompt"], max_tokens=300, temperature=0, ignore_eos=True)
    with grpc.insecure_channel(served.grpc) as channel:
        stub = pb_grpc.ShardServeStub(channel)
        assert [m.id for m in stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30).models] == ["faulty"]
        assert stub.Health(pb.HealthRequest(), metadata=metadata, timeout=30).status == "ok"
        want = stub.Generate(request, metadata=metadata, timeout=120).text
        stream = stub.GenerateStream(request, metadata=metadata, timeout=180)
        whole = stub.Generate.future(request, metadata=metadata, timeout=180)
        first = next(stream)
        for replica in replica_ids("failover"):
            os.kill(replica_pid("failover", replica), signal.SIGKILL)
        assert first.text + "".join(m.text for m in stream) == want
        assert whole.result().text == want


@pytest.fixture
def failover_one_url(served, tiny_llama_dir, failover_url):
    from ray import serve

    serve.delete("failover")
    yield start_app(served, tiny_llama_dir, "failover1", replica_failover=True, max_migrations=1, max_queued_requests=-1)
    serve.delete("failover1")


def test_one_replica_streams_wait_for_its_replacement_then_fail_past_max_migrations(failover_one_url):
    """One replica (a TP=2 gang), max_migrations 1: killed mid-answer, a stream and a non-streamed
    request wait for the replacement Serve starts and end with the undisturbed text. A stream whose
    replica is killed twice ends with the OpenAI error event and [DONE]."""
    url = failover_one_url
    wait_healthy(url)
    want = httpx.post(url + "/v1/completions", json=LONG, headers=AUTH, timeout=120).json()["choices"][0]["text"]
    answers, ended_after = kill_replica_mid_answer(url, "failover1", [{**LONG, "stream": True}, LONG])
    assert answers[0][-1] == "[DONE]" and all("error" not in e for e in answers[0][:-1])
    assert text_of(answers[0]) == want
    assert answers[1]["choices"][0]["text"] == want
    print(f"one replica killed: answers completed {ended_after:.1f} s after the kill")

    wait_healthy(url)

    async def killed_twice() -> list:
        events = []
        async with httpx.AsyncClient(timeout=180) as client:
            async with client.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, headers=AUTH) as r:
                kills = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        data = line[len("data: "):]
                        events.append(data if data == "[DONE]" else json.loads(data))
                        if kills < 2 and len(events) in (2, 20):  # a token now, and again after it resumed
                            (replica,) = replica_ids("failover1")
                            os.kill(replica_pid("failover1", replica), signal.SIGKILL)
                            kills += 1
        return events

    events = asyncio.run(asyncio.wait_for(killed_twice(), 240))
    assert_error_event_then_done(events)
    assert events[-2]["error"]["code"] == "replica_failed"
    assert want.startswith(text_of(events))  # what came before the error is the right text
