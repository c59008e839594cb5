"""One streamed chat completion against an OpenAI-compatible server, timed as its user sees it.

TTFT is the time from sending the request to the first chunk with text; ITL the gaps between
later chunks with text (one token per chunk, as vLLM, llama.cpp and shardserve stream them);
E2E the time to the end of the stream. Token counts are the server's own ``usage``
(``stream_options.include_usage``), falling back to the number of text chunks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from deployments.bench.datasets import BenchRequest


@dataclass
class RequestResult:
    status: str  # "200", an HTTP status, or "error: <kind>" when no status came back
    start_s: float  # when it was sent, on the runner's clock
    e2e_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "200" and not self.error


def request_body(model: str, req: BenchRequest) -> dict:
    """Greedy, a fixed number of tokens (``ignore_eos``, which vLLM, llama.cpp and shardserve take), streamed."""
    return {
        "model": model,
        "messages": req.messages,
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def send(client: httpx.AsyncClient, base_url: str, model: str, req: BenchRequest, *,
               headers: dict | None = None, clock=time.perf_counter) -> RequestResult:
    start = clock()
    result = RequestResult(status="", start_s=start, e2e_s=0.0)
    chunks = 0
    last = None
    done = False
    try:
        async with client.stream("POST", f"{base_url}/v1/chat/completions", json=request_body(model, req),
                                 headers=headers) as response:  # fmt: skip
            result.status = str(response.status_code)
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:300]
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = json.dumps(chunk["error"])[:300]
                    break
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    result.output_tokens = chunk["usage"].get("completion_tokens", 0)
                if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                    now = clock()
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
                    chunks += 1
            if not done and not result.error:
                result.error = "the stream ended without [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.status = result.status or f"error: {type(e).__name__}"
        result.error = str(e)[:300] or type(e).__name__
    finally:
        result.e2e_s = clock() - start
    result.output_tokens = result.output_tokens or chunks
    return result
