"""Faults a client meets on a real app: a worker of a replica's TP gang killed or stopped mid-stream,
and a burst past a replica's capacity. Its own app ("faults", under /faults) on the session's Serve:
one replica of the tiny Llama on a TP=2 gang, so a worker can fail while its replica lives on.

What the client sees today (resuming on another replica is not built yet): the stream ends with
an OpenAI error event and [DONE], never cut silently; /health says 503 until Serve has replaced
the replica; the replacement serves the same greedy text.
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

PREFIX = "/faults"
LONG = {"model": "faulty", "prompt": "The quick brown fox", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def faults_url(served, tiny_llama_dir):
    from ray import serve

    from deployments.app import build_app
    from deployments.config import parse_app_config

    config = parse_app_config({
        "model": str(tiny_llama_dir), "served_model_name": "faulty", "num_replicas": 1, "tensor_parallel_size": 2,
        "cpus_per_worker": 0.25, "num_kv_blocks": 256, "max_num_seqs": 4, "max_queued_requests": 2,
        "step_timeout_s": 1.0, "api_key": API_KEY,
    })  # fmt: skip
    serve.run(build_app(config), name="faults", route_prefix=PREFIX)
    yield served.http + PREFIX
    serve.delete("faults")


def gang_worker_pids() -> list[int]:
    """The faults app's Worker actors: the only gang in the session (the shared app runs tp = 1 in-process)."""
    return sorted(p.pid for p in psutil.process_iter(["cmdline"])
                  if (p.info["cmdline"] or [""])[0].startswith("ray::Worker"))  # fmt: skip


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


async def stream_events(client: httpx.AsyncClient, url: str, started: asyncio.Event) -> list:
    """Every SSE data payload of one streamed completion (parsed JSON, or the literal [DONE])."""
    events = []
    async with client.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, headers=AUTH) as r:
        assert r.status_code == 200
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


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_broken_worker_ends_streams_with_an_error_event_and_the_replacement_serves_the_same(faults_url, sig):
    wait_healthy(faults_url)
    before = greedy_text(faults_url)
    events, ended_after = break_a_worker_mid_stream(faults_url, sig)
    for e in events:
        assert_error_event_then_done(e)
    if sig == signal.SIGSTOP:  # detected by the step deadline: max(step_timeout_s = 1 s, 10x a tiny step)
        assert ended_after < 10
    health = httpx.get(faults_url + "/health", timeout=10)
    if health.status_code != 200:  # until Serve has replaced the replica: 503 and the reason
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_failed"
    recovered_after = wait_healthy(faults_url)
    print(f"{signal.Signals(sig).name}: streams ended {ended_after:.1f} s after the signal; healthy again "
          f"{recovered_after:.1f} s later")
    assert greedy_text(faults_url) == before


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
