"""LLMServer: one Serve replica = one gang + engine, placed in the replica's own placement group."""

from __future__ import annotations

from typing import AsyncIterator

from ray import serve
from ray.util import get_current_placement_group

from cluster.engine import EngineConfig, LLMEngine
from cluster.gang import placement_strategy, worker_bundles
from deployments.config import AppConfig
from model.sampling import SamplingParams
from model.tokenizer import encode_prompt

REPLICA_CPUS = 0.1  # the replica process itself only schedules; workers do the math


def replica_engine_config(config: AppConfig) -> EngineConfig:
    """A replica reserves whole CPUs per worker unless the config says otherwise."""
    return config.model_copy(update={"cpus_per_worker": config.cpus_per_worker or 1.0}).engine_config()


def replica_bundles(config: AppConfig) -> list[dict[str, float]]:
    """Bundle 0 holds the replica; one bundle per worker follows, in rank order."""
    engine = replica_engine_config(config)
    return [{"CPU": REPLICA_CPUS}] + worker_bundles(engine.parallel, engine.device, engine.cpus_per_worker)


class LLMServer:
    def __init__(self, config: AppConfig):
        self.engine = LLMEngine(
            replica_engine_config(config), pg=get_current_placement_group(), bundle_offset=1
        )

    async def generate(self, request: dict) -> AsyncIterator[dict]:
        """Stream deltas for one request; the first item is {"error": ...} when it cannot run."""
        try:
            ids = encode_prompt(self.engine.tokenizer, request["prompt"], raw=request.get("raw", False))
            sampling = dict(request["sampling"])
            if sampling.get("max_tokens") is None:  # OpenAI's default: the rest of the context
                sampling["max_tokens"] = max(1, self.engine.max_model_len - len(ids))
            params = SamplingParams(**sampling)
            self.engine.check_request(ids, params)
        except ValueError as e:
            yield {"error": str(e)}
            return
        replica = serve.get_replica_context().replica_id.unique_id
        async for out in self.engine.generate(ids, params):
            yield {
                "replica": replica,
                "text": out.text,
                "token_ids": out.token_ids,
                "finish_reason": out.finish_reason,
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "logprobs": [
                    {
                        "token_id": lp.token_id,
                        "token": self.engine.tokenizer.decode([lp.token_id]),
                        "logprob": lp.logprob,
                        "top": [(self.engine.tokenizer.decode([t]), v) for t, v in (lp.top or [])],
                    }
                    for lp in (out.logprobs or [])
                ],
            }

    async def check_health(self) -> None:
        await self.engine.check_health()  # raises when the gang is broken, so Serve replaces us

    async def __del__(self):
        await self.engine.shutdown()


def llm_server_deployment(config: AppConfig):
    options = dict(
        name="LLMServer",
        placement_group_bundles=replica_bundles(config),
        placement_group_strategy=placement_strategy(replica_engine_config(config).parallel),
        ray_actor_options={"num_cpus": REPLICA_CPUS},
        max_ongoing_requests=config.max_num_seqs * 2,
        max_queued_requests=config.max_queued_requests,
        health_check_period_s=10,
    )
    if config.autoscaling is not None:
        a = config.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
        }
    else:
        options["num_replicas"] = config.num_replicas
    return serve.deployment(LLMServer, **options)
