"""Prefix-affinity routing over the shared 2-replica app, and the pure prefix hashing behind it."""

from __future__ import annotations

from deployments.request_router import prefix_keys, prompt_text
from tests.deployments.served_app import greedy_chat, post_chats

SYSTEM = "You are a careful assistant for the fleet operations team. " * 8  # ~480 characters


def test_prefix_keys_share_a_prefix_and_ignore_short_prompts():
    a = prefix_keys("x" * 300 + "question one", chunk_chars=64, min_prefix_chars=256)
    b = prefix_keys("x" * 300 + "another question", chunk_chars=64, min_prefix_chars=256)
    assert a and a[0] == b[0]  # the shared 256 characters hash alike
    assert prefix_keys("short prompt", chunk_chars=64, min_prefix_chars=256) == []
    chat = prompt_text([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert chat == "<|system|>S<|user|>U"


def chat(base_url: str, system: str, question: str) -> str:
    return post_chats(base_url, [greedy_chat(system, question, max_tokens=2)])[0]


def test_requests_sharing_a_long_prefix_stay_on_one_replica(served):
    for n in range(3):
        system = f"[team {n}] " + SYSTEM
        replicas = {chat(served.http, system, f"question {i}?") for i in range(5)}
        assert len(replicas) == 1, (n, replicas)


def test_load_spreads_when_the_prefix_owner_is_saturated(served):
    chat(served.http, "[burst] " + SYSTEM, "warm up")  # some replica now owns this prefix

    # 300 tokens each: long enough that all 24 are in flight at once. The second 12 go a second
    # later, once the router's view of the owner's queue has caught up with the first 12 (requests
    # sent in the same instant can all be routed on the owner's queue length from before them).
    bodies = [greedy_chat("[burst] " + SYSTEM, f"q{i}", max_tokens=300) for i in range(24)]
    replicas = post_chats(served.http, bodies, delays=[0.0] * 12 + [1.0] * 12)
    # max_imbalance is 32 // 4 = 8: past that, the owner's lead sends work to the other replica.
    assert len(set(replicas)) == 2, replicas
