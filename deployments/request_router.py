"""PrefixAffinityRouter: which LLMServer replica gets a request.

Requests that share a long prompt prefix (one system prompt, one growing chat) go to the replica
that served that prefix last, because its engine still holds the prefix's KV blocks (prefix
caching) and skips recomputing them. Affinity yields to load: when that replica has more than
``max_imbalance`` requests more than the least-loaded candidate, the request is balanced like any
other, to the less loaded of two replicas drawn at random.

The router decides alone and remembers its decisions when it makes them: on the HAProxy path
(deployments/router.py) the request does not go through Serve's handle, so Serve neither probes
queue lengths nor reports where a request went. A replica's load is what it last reported
(``LLMServer.record_routing_stats``: running and waiting sequences, every half second) plus the
requests sent to it since.

Prefixes are tracked as text, not tokens, so the router never loads a tokenizer: the prompt (or
the chat turns, joined with their roles) is hashed at every ``chunk_chars`` boundary from
``min_prefix_chars`` on, and the longest hash a replica owns wins.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

RECENT_S = 1.0  # requests routed this recently count as load a replica may not have reported yet


ROUTING_PREFIX_CHARS = 64 << 10  # of a prompt's text, what prefix affinity looks at (~16k tokens)


@dataclass(frozen=True)
class RoutingRequest:
    """What the router reads of a request: the start of its prompt's text (prompt_text), bounded
    because it travels with the request and is hashed chunk by chunk."""

    prompt: str

    @classmethod
    def of(cls, prompt: str | list) -> "RoutingRequest":
        """For a prompt as a request gives it: text, chat messages, or token ids."""
        return cls(prompt_text(prompt)[:ROUTING_PREFIX_CHARS])


def prompt_text(prompt: str | list) -> str:
    """The text a prefix is matched on: the raw prompt, each chat turn tagged with its role, or token ids."""
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
        self._recent: deque[tuple[float, ReplicaID]] = deque()  # (when, where) of recent decisions

    def _keys(self, pending_request: PendingRequest | None) -> list[str]:
        # Read by attribute: Serve may load this router class apart from the module the Router
        # imports, so an isinstance check against RoutingRequest can fail for a RoutingRequest.
        prompt = getattr(pending_request.args[0], "prompt", None) if pending_request and pending_request.args else None
        if not isinstance(prompt, str):
            return []
        return prefix_keys(prompt, self.chunk_chars, self.min_prefix_chars)

    def _loads(self, replicas: list[RunningReplica]) -> dict[ReplicaID, int]:
        while self._recent and self._recent[0][0] < time.monotonic() - RECENT_S:
            self._recent.popleft()
        loads = {}
        for r in replicas:
            stats = r.routing_stats or {}
            loads[r.replica_id] = stats.get("running", 0) + stats.get("waiting", 0)
        for _, replica_id in self._recent:
            if replica_id in loads:
                loads[replica_id] += 1
        return loads

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        keys = self._keys(pending_request)
        loads = self._loads(candidate_replicas)
        chosen = None
        by_id = {r.replica_id: r for r in candidate_replicas}
        for key in reversed(keys):  # longest prefix first
            owner = by_id.get(self._owners.get(key))
            if owner is not None:
                if loads[owner.replica_id] <= min(loads.values()) + self.max_imbalance:
                    chosen = owner
                break  # the owner is much busier than the rest: balance instead
        if chosen is None:  # the less loaded of two drawn at random
            chosen = min(random.sample(candidate_replicas, min(2, len(candidate_replicas))),
                         key=lambda r: loads[r.replica_id])  # fmt: skip
        self._remember(keys, chosen.replica_id)
        return [[chosen]]

    def _remember(self, keys: list[str], replica_id: ReplicaID) -> None:
        self._recent.append((time.monotonic(), replica_id))
        for key in keys:
            self._owners[key] = replica_id
            self._owners.move_to_end(key)
        while len(self._owners) > self.max_prefixes:
            self._owners.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, owner in self._owners.items() if owner == replica_id]:
            del self._owners[key]
