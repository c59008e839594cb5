"""LLMServer: one Serve replica = one gang + engine, placed in the replica's own placement group.

Besides generating, a replica reports its engine's state: as metrics
(deployments/metrics.py), and as the autoscaling signal Serve collects through
``record_autoscaling_stats`` (deployments/autoscaling.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from ray import serve
from ray.util import get_current_placement_group

from cluster.engine import LLMEngine
from cluster.protocol import GenerateRequest, InvalidRequestError
from deployments.autoscaling import engine_utilization
from deployments.config import AppConfig, AutoscalingConfig
from deployments.metrics import ReplicaMetrics, RequestTimer
from deployments.placement import replica_actor_options, replica_bundles, replica_engine_config
from deployments.protocol import RequestError, ServedOutput

METRICS_PERIOD_S = 2.0  # how often engine gauges are refreshed


class LLMServer:
    def __init__(self, config: AppConfig, model_name: str):
        self.engine = LLMEngine(
            replica_engine_config(config), pg=get_current_placement_group(), bundle_offset=1
        )
        self.max_num_seqs = config.max_num_seqs
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = ReplicaMetrics(model_name, self.replica)
        self._report_task: asyncio.Task | None = None

    def _ensure_reporting(self) -> None:
        if self._report_task is None or self._report_task.done():
            self._report_task = asyncio.get_running_loop().create_task(self._report())

    async def _report(self) -> None:
        while True:
            self.metrics.engine(self.engine.stats(), self.max_num_seqs)
            await asyncio.sleep(METRICS_PERIOD_S)

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"engine_utilization": engine_utilization(self.engine.stats(), self.max_num_seqs)}

    async def generate(self, request: GenerateRequest) -> AsyncIterator[ServedOutput]:
        """Stream one request's deltas; a request that can never run raises RequestError before any."""
        self._ensure_reporting()
        timer = RequestTimer(self.metrics, time.monotonic())
        try:
            async for out in self.engine.generate(request):
                timer.tokens(time.monotonic(), len(out.token_ids))
                if out.finished:
                    timer.finished(time.monotonic(), out.prompt_tokens)
                yield ServedOutput(self.replica, out)
        except InvalidRequestError as e:
            raise RequestError.invalid(str(e), code="invalid_request") from None

    async def check_health(self) -> None:
        self._ensure_reporting()  # metrics flow from the first health check on, before any request
        await self.engine.check_health()  # raises when the gang is broken, so Serve replaces us

    async def __del__(self):
        if self._report_task is not None:
            self._report_task.cancel()
        await self.engine.shutdown()


def serve_autoscaling_config(a: AutoscalingConfig) -> dict:
    """The config's autoscaling block in Serve's terms."""
    out = {
        "min_replicas": a.min_replicas,
        "max_replicas": a.max_replicas,
        "target_ongoing_requests": a.target_ongoing_requests,
        "upscale_delay_s": a.upscale_delay_s,
        "downscale_delay_s": a.downscale_delay_s,
        "look_back_period_s": a.look_back_period_s,
    }
    if a.metric == "engine_utilization":
        out["policy"] = {
            "policy_function": "deployments.autoscaling:EngineUtilizationPolicy",
            "policy_kwargs": {"target_utilization": a.target_engine_utilization},
        }
    return out


def llm_server_deployment(config: AppConfig):
    options = dict(
        name="LLMServer",
        placement_group_bundles=replica_bundles(config),
        placement_group_strategy=config.parallel.placement_strategy,
        ray_actor_options=replica_actor_options(config),
        max_ongoing_requests=config.max_num_seqs * 2,
        max_queued_requests=config.max_queued_requests,
        health_check_period_s=10,
    )
    if config.routing == "prefix_affinity":
        options["request_router_config"] = {
            "request_router_class": "deployments.request_router:PrefixAffinityRouter",
            # "Much busier" than the least-loaded replica: a quarter of a full batch more.
            "request_router_kwargs": {"max_imbalance": max(1, config.max_num_seqs // 4)},
        }
    if config.autoscaling is not None:
        options["autoscaling_config"] = serve_autoscaling_config(config.autoscaling)
    else:
        options["num_replicas"] = config.num_replicas
    return serve.deployment(LLMServer, **options)
