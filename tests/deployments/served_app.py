"""The app the serving tests share: the tiny Llama on 2 replicas, HTTP and gRPC on free loopback ports."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

API_KEY = "test-key"
PROMPT = "The quick brown fox"
APP_ARGS = {
    "served_model_name": "tiny",
    "num_replicas": 2,
    "cpus_per_worker": 0.25,
    "num_kv_blocks": 256,
    "api_key": API_KEY,
}


@dataclass(frozen=True)
class Served:
    http: str  # base URL
    grpc: str  # host:port


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def greedy_chat(system: str, question: str, max_tokens: int) -> dict:
    """A greedy /v1/chat/completions body: a system prompt and one question."""
    return {
        "model": "tiny",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


def post_chats(base_url: str, bodies: list[dict], timeout: float = 300, delays: list[float] | None = None) -> list[str]:
    """Send the chat bodies all at once (or each after its delay in seconds); the replica that served each, in order."""

    async def main():
        async with httpx.AsyncClient(timeout=timeout) as client:

            async def one(body, delay):
                await asyncio.sleep(delay)
                r = await client.post(base_url + "/v1/chat/completions", json=body, headers=AUTH)
                r.raise_for_status()
                return r.headers["x-shardserve-replica"]

            return await asyncio.gather(*(one(b, d) for b, d in zip(bodies, delays or [0.0] * len(bodies))))

    return asyncio.run(main())
