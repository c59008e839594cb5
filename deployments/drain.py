"""Stopping without cutting anyone off: `shardserve serve` asks its replicas to drain, and waits
until the requests they hold have finished.

The flag and the counts live in Ray's internal key-value store (the GCS), which the CLI and every
replica reach without a handle to each other: the CLI sets the app's drain flag; each replica
looks at it every DRAIN_POLL_S, refuses new requests with 503 from then on (its /health too), and
writes how many requests it still holds; the CLI sums those until they reach 0 or its drain
timeout passes, then shuts Serve and Ray down.
"""

from __future__ import annotations

from ray.experimental import internal_kv

NAMESPACE = "shardserve"
DRAIN_POLL_S = 0.5  # how often a replica looks at the flag


def _drain_key(app: str) -> str:
    return f"drain:{app}"


def _in_flight_prefix(app: str) -> str:
    return f"in_flight:{app}:"


def request_drain(app: str) -> None:
    internal_kv._internal_kv_put(_drain_key(app), b"1", namespace=NAMESPACE)


def drain_requested(app: str) -> bool:
    return internal_kv._internal_kv_exists(_drain_key(app), namespace=NAMESPACE)


def report_in_flight(app: str, replica: str, count: int) -> None:
    internal_kv._internal_kv_put(_in_flight_prefix(app) + replica, str(count).encode(), namespace=NAMESPACE)


def in_flight(app: str) -> int:
    """Requests the app's replicas last said they hold."""
    prefix = _in_flight_prefix(app)
    keys = internal_kv._internal_kv_list(prefix, namespace=NAMESPACE)
    values = (internal_kv._internal_kv_get(k, namespace=NAMESPACE) for k in keys)
    return sum(int(v) for v in values if v)


def clear(app: str) -> None:
    """Forget the app's flag and counts (a later start begins serving)."""
    internal_kv._internal_kv_del(_drain_key(app), namespace=NAMESPACE)
    internal_kv._internal_kv_del(_in_flight_prefix(app), del_by_prefix=True, namespace=NAMESPACE)
