"""shardserve's metrics, through ray.util.metrics: they reach Ray's Prometheus endpoint and the dashboard.

The engine's metrics carry vLLM's names as Ray exports vLLM's own (Ray Serve LLM): ``vllm:`` becomes
``vllm_`` (Ray allows no ``:``), Ray prefixes ``ray_`` and counters get ``_total``
(``ray_vllm_num_requests_running``, ``ray_vllm_generation_tokens_total``), with the ``model_name``
label. So dashboards and autoscalers written for vLLM on Ray, Ray's own "Serve LLM" Grafana
dashboard among them, chart shardserve unchanged. What vLLM has no name for stays ``shardserve_``:
requests by route and status, the autoscaling signal, prefill tokens computed.
k8s/grafana/shardserve.json charts them all.
"""

from __future__ import annotations

from ray.util import metrics

from cluster.protocol import EngineStats
from deployments.autoscaling import engine_utilization

# Seconds; spans a fast GPU token (1 ms) to a long generation (minutes).
LATENCY_BOUNDARIES = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60, 120, 300]
# Tokens per request, in steps of 1, 2, 5 as vLLM's.
TOKEN_BOUNDARIES = [m * 10**e for e in range(6) for m in (1, 2, 5)]


class RouterMetrics:
    def __init__(self, model: str):
        self.requests = metrics.Counter(
            "shardserve_requests",
            description="Requests answered, by route and status (HTTP code or gRPC code name).",
            tag_keys=("model_name", "route", "status"),
        )
        self.requests.set_default_tags({"model_name": model})

    def request(self, route: str, status: int | str) -> None:
        self.requests.inc(1, tags={"route": route, "status": str(status)})


class ReplicaMetrics:
    TAGS = ("model_name", "replica")

    def __init__(self, model: str, replica: str):
        def histogram(name: str, description: str, boundaries=LATENCY_BOUNDARIES) -> metrics.Histogram:
            return metrics.Histogram(name, description=description, boundaries=boundaries, tag_keys=self.TAGS)

        def counter(name: str, description: str) -> metrics.Counter:
            return metrics.Counter(name, description=description, tag_keys=self.TAGS)

        def gauge(name: str, description: str) -> metrics.Gauge:
            return metrics.Gauge(name, description=description, tag_keys=self.TAGS)

        self.ttft = histogram("vllm_time_to_first_token_seconds", "From a request reaching the replica to its first token.")
        self.itl = histogram("vllm_inter_token_latency_seconds", "Time between two tokens of one request.")
        self.tpot = histogram("vllm_request_time_per_output_token_seconds", "A request's mean time per token after the first.")
        self.e2e = histogram("vllm_e2e_request_latency_seconds", "From a request reaching the replica to its last token.")
        self.request_prompt_tokens = histogram("vllm_request_prompt_tokens", "Prompt tokens per finished request.", TOKEN_BOUNDARIES)
        self.request_generation_tokens = histogram("vllm_request_generation_tokens", "Tokens generated per finished request.", TOKEN_BOUNDARIES)
        self.prompt_tokens = counter("vllm_prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("vllm_generation_tokens", "Tokens generated.")
        self.request_success = metrics.Counter("vllm_request_success", description="Finished requests, by finish reason.",
                                               tag_keys=("model_name", "replica", "finished_reason"))  # fmt: skip
        self.running = gauge("vllm_num_requests_running", "Sequences in the engine's running batch.")
        self.waiting = gauge("vllm_num_requests_waiting", "Sequences waiting for room in the batch or the KV cache.")
        self.kv_usage = gauge("vllm_kv_cache_usage_perc", "Share of KV cache blocks held by sequences (0-1).")
        self.engine_utilization = gauge("shardserve_engine_utilization", "The autoscaling signal: 1 = batch or KV cache full.")
        # Engine counters are cumulative; they are exported as deltas since the last report.
        self.engine_counters = {
            "prefix_cache_query_tokens": counter("vllm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
            "prefix_cache_hit_tokens": counter("vllm_prefix_cache_hits", "Prompt tokens served from cached KV blocks."),
            "prefill_tokens_computed": counter("shardserve_prefill_tokens_computed", "Prompt (and recomputed) tokens the model actually ran."),
            "preemptions": counter("vllm_num_preemptions", "Sequences preempted for lack of KV blocks (recomputed later)."),
        }
        self._last_counts = dict.fromkeys(self.engine_counters, 0)
        tags = {"model_name": model, "replica": replica}
        for m in (self.ttft, self.itl, self.tpot, self.e2e, self.request_prompt_tokens, self.request_generation_tokens,
                  self.prompt_tokens, self.generation_tokens, self.request_success, self.running, self.waiting,
                  self.kv_usage, self.engine_utilization, *self.engine_counters.values()):  # fmt: skip
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
        self.first_token_at: float | None = None
        self.generated = 0

    def tokens(self, now: float, n: int) -> None:
        if n == 0:
            return
        if self.first_token_at is None:
            self.m.ttft.observe(now - self.start)
            self.first_token_at = now
        else:
            self.m.itl.observe((now - self.last) / n)
        self.last = now
        self.generated += n
        self.m.generation_tokens.inc(n)

    def finished(self, now: float, prompt_tokens: int, finish_reason: str | None) -> None:
        self.m.e2e.observe(now - self.start)
        if self.generated > 1:
            self.m.tpot.observe((now - self.first_token_at) / (self.generated - 1))
        self.m.prompt_tokens.inc(prompt_tokens)
        self.m.request_prompt_tokens.observe(prompt_tokens)
        self.m.request_generation_tokens.observe(self.generated)
        self.m.request_success.inc(1, tags={"finished_reason": finish_reason or "stop"})
