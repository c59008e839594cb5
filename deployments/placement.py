"""What one replica reserves, for the LLMServer deployment and the Kubernetes fit check alike.

A replica's placement group is bundle 0 for the replica actor itself, then one bundle per
worker in rank order, packed as the parallel layout requires (a TP group on one host). With
``worker_process: in_process`` the replica runs the model in its own process
(cluster/local_gang.py), so bundle 0 holds the worker's CPUs or GPU and no other bundle follows. This module loads
neither Ray nor torch, so rendering and checking manifests stays light.
"""

from __future__ import annotations

from cluster.config import EngineConfig
from deployments.config import AppConfig

REPLICA_CPUS = 0.1  # the replica process itself: it schedules, tokenizes and streams
ROUTER_CPUS = 0.1  # the Router: picks the replica for each request (HAProxy mode)


def replica_engine_config(config: AppConfig) -> EngineConfig:
    """A replica reserves whole CPUs per worker unless the config says otherwise."""
    engine = config.engine_config()
    return engine.model_copy(update={"cpus_per_worker": engine.cpus_per_worker or 1.0})


def replica_bundles(config: AppConfig) -> list[dict[str, float]]:
    """Bundle 0 holds the replica; one bundle per worker follows, in rank order."""
    engine = replica_engine_config(config)
    workers = engine.parallel.worker_bundles(engine.device, engine.cpus_per_worker)
    if engine.worker_in_process:  # the model runs inside the replica
        (worker,) = workers
        return [{**worker, "CPU": round(worker.get("CPU", 0.0) + REPLICA_CPUS, 6)}]
    return [{"CPU": REPLICA_CPUS}] + workers


def replica_actor_options(config: AppConfig) -> dict[str, float]:
    """The replica actor's own resources: bundle 0, in Ray's option names."""
    bundle = replica_bundles(config)[0]
    options = {"num_cpus": bundle["CPU"]}
    if bundle.get("GPU"):
        options["num_gpus"] = bundle["GPU"]
    return options
