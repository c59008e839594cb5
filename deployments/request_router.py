"""PrefixAffinityRouter: which LLMServer replica gets a request.

Requests that share a long prompt prefix (one system prompt, one growing chat)
go to the replica that served that prefix last, because its engine still holds
the prefix's KV blocks (prefix caching) and skips recomputing them. Affinity
yields to load: when that replica has more than ``max_imbalance`` requests
more than the least-loaded candidate, the request is balanced like any other,
by power of two choices over the replicas' outstanding requests.

Prefixes are tracked as text, not tokens, so the router never loads a
tokenizer: the prompt (or the chat turns, joined with their roles) is hashed
at every ``chunk_chars`` boundary from ``min_prefix_chars`` on, and the
longest hash a replica owns wins.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from cluster.protocol import GenerateRequest


def prompt_text(request: GenerateRequest) -> str:
    """The text a prefix is matched on: the raw prompt, each chat turn tagged with its role, or token ids."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return prompt
    return "".join(f"<|{m.get('role')}|>{m.get('content')}" if isinstance(m, dict) else f"{m}," for m in prompt)


def prefix_keys(text: str, chunk_chars: int, min_prefix_chars: int) -> list[str]:
    """Hashes of text[:k] for every chunk boundary k >= min_prefix_chars, shortest first."""
    h = hashlib.blake2b(digest_size=16)
    keys = []
    for end in range(chunk_chars, len(text) + 1, chunk_chars):
        h.update(text[end - chunk_chars : end].encode())
        if end >= min_prefix_chars:
            keys.append(h.copy().hexdigest())
    return keys


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(
        self,
        chunk_chars: int = 64,
        min_prefix_chars: int = 256,
        max_imbalance: int = 4,
        max_prefixes: int = 100_000,
    ):
        self.chunk_chars = chunk_chars
        self.min_prefix_chars = min_prefix_chars
        self.max_imbalance = max_imbalance
        self.max_prefixes = max_prefixes
        self._owners: OrderedDict[str, ReplicaID] = OrderedDict()  # prefix hash -> replica, LRU order

    def _keys(self, pending_request: PendingRequest | None) -> list[str]:
        if pending_request is None or not pending_request.args or not isinstance(pending_request.args[0], GenerateRequest):
            return []
        return prefix_keys(prompt_text(pending_request.args[0]), self.chunk_chars, self.min_prefix_chars)

    def _load(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    @staticmethod
    def _two_choices(replicas: list[RunningReplica]) -> list[RunningReplica]:
        # Serve probes both and sends to the one with fewer outstanding requests.
        return random.sample(replicas, min(2, len(replicas)))

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id: r for r in candidate_replicas}
        for key in reversed(self._keys(pending_request)):  # longest prefix first
            owner = by_id.get(self._owners.get(key))
            if owner is None:
                continue
            least = min(self._load(r) for r in candidate_replicas)
            if self._load(owner) <= least + self.max_imbalance:
                others = [r for r in candidate_replicas if r is not owner]
                return [[owner]] + ([self._two_choices(others)] if others else [])
            break  # the owner is much busier than the rest: balance instead
        return [self._two_choices(candidate_replicas)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        for key in self._keys(pending_request):
            self._owners[key] = replica_id
            self._owners.move_to_end(key)
        while len(self._owners) > self.max_prefixes:
            self._owners.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, owner in self._owners.items() if owner == replica_id]:
            del self._owners[key]
