"""shardserve's metrics, through ray.util.metrics: they reach Ray's Prometheus endpoint and the dashboard.

Exported names get Ray's ``ray_`` prefix, and counters a ``_total`` suffix
(``ray_shardserve_requests_total``). The router counts requests by route and
status; each LLMServer replica reports latencies, tokens and its engine's
state, tagged with the model and the replica. k8s/grafana/shardserve.json
charts them.
"""

from __future__ import annotations

from ray.util import metrics

from cluster.protocol import EngineStats
from deployments.autoscaling import engine_utilization

# Seconds; spans a fast GPU token (1 ms) to a long generation (minutes).
LATENCY_BOUNDARIES = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60, 120, 300]


class RouterMetrics:
    def __init__(self, model: str):
        self.requests = metrics.Counter(
            "shardserve_requests",
            description="Requests answered by the router, by route and status (HTTP code or gRPC code name).",
            tag_keys=("model", "route", "status"),
        )
        self.requests.set_default_tags({"model": model})

    def request(self, route: str, status: int | str) -> None:
        self.requests.inc(1, tags={"route": route, "status": str(status)})


class ReplicaMetrics:
    TAGS = ("model", "replica")

    def __init__(self, model: str, replica: str):
        def histogram(name: str, description: str) -> metrics.Histogram:
            return metrics.Histogram(name, description=description, boundaries=LATENCY_BOUNDARIES, tag_keys=self.TAGS)

        def counter(name: str, description: str) -> metrics.Counter:
            return metrics.Counter(name, description=description, tag_keys=self.TAGS)

        def gauge(name: str, description: str) -> metrics.Gauge:
            return metrics.Gauge(name, description=description, tag_keys=self.TAGS)

        self.ttft = histogram("shardserve_time_to_first_token_seconds", "From a request reaching the replica to its first token.")
        self.itl = histogram("shardserve_inter_token_latency_seconds", "Time between two tokens of one request.")
        self.e2e = histogram("shardserve_request_latency_seconds", "From a request reaching the replica to its last token.")
        self.prompt_tokens = counter("shardserve_prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("shardserve_generation_tokens", "Tokens generated.")
        self.running = gauge("shardserve_running_sequences", "Sequences in the engine's running batch.")
        self.waiting = gauge("shardserve_waiting_sequences", "Sequences waiting for room in the batch or the KV cache.")
        self.kv_usage = gauge("shardserve_kv_cache_usage", "Share of KV cache blocks held by sequences (0-1).")
        self.engine_utilization = gauge("shardserve_engine_utilization", "The autoscaling signal: 1 = batch or KV cache full.")
        # Engine counters are cumulative; they are exported as deltas since the last report.
        self.engine_counters = {
            "prefix_cache_hit_tokens": counter("shardserve_prefix_cache_hit_tokens", "Prompt tokens served from cached KV blocks."),
            "prefix_cache_query_tokens": counter("shardserve_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache."),
            "prefill_tokens_computed": counter("shardserve_prefill_tokens_computed", "Prompt (and recomputed) tokens the model actually ran."),
            "preemptions": counter("shardserve_preemptions", "Sequences preempted for lack of KV blocks (recomputed later)."),
        }
        self._last_counts = dict.fromkeys(self.engine_counters, 0)
        tags = {"model": model, "replica": replica}
        for m in (self.ttft, self.itl, self.e2e, self.prompt_tokens, self.generation_tokens, self.running,
                  self.waiting, self.kv_usage, self.engine_utilization, *self.engine_counters.values()):  # fmt: skip
            m.set_default_tags(tags)

    def engine(self, stats: EngineStats, max_num_seqs: int) -> None:
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.engine_utilization.set(engine_utilization(stats, max_num_seqs))
        for key, counter in self.engine_counters.items():
            count = getattr(stats, key)
            if count > self._last_counts[key]:
                counter.inc(count - self._last_counts[key])
            self._last_counts[key] = count


class RequestTimer:
    """Latencies and token counts of one request on a replica."""

    def __init__(self, replica_metrics: ReplicaMetrics, now: float):
        self.m = replica_metrics
        self.start = self.last = now
        self.first = True

    def tokens(self, now: float, n: int) -> None:
        if n == 0:
            return
        if self.first:
            self.m.ttft.observe(now - self.start)
            self.first = False
        else:
            self.m.itl.observe((now - self.last) / n)
        self.last = now
        self.m.generation_tokens.inc(n)

    def finished(self, now: float, prompt_tokens: int) -> None:
        self.m.e2e.observe(now - self.start)
        self.m.prompt_tokens.inc(prompt_tokens)
