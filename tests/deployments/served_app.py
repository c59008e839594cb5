"""The app the serving tests share: the tiny Llama on 2 replicas, HTTP and gRPC on free loopback ports."""

from __future__ import annotations

from dataclasses import dataclass

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
