"""What one replica reserves, for the LLMServer deployment and the Kubernetes fit check alike.

A replica's placement group is bundle 0 for the replica actor itself, then one bundle per
worker in rank order, packed as the parallel layout requires (a TP group on one host). This
module loads neither Ray nor torch, so rendering and checking manifests stays light.
"""

from __future__ import annotations

from cluster.config import EngineConfig
from deployments.config import AppConfig

REPLICA_CPUS = 0.1  # the replica process itself only schedules; workers do the math
ROUTER_CPUS = 0.1  # the Router ingress: parses, routes and streams


def replica_engine_config(config: AppConfig) -> EngineConfig:
    """A replica reserves whole CPUs per worker unless the config says otherwise."""
    engine = config.engine_config()
    return engine.model_copy(update={"cpus_per_worker": engine.cpus_per_worker or 1.0})


def replica_bundles(config: AppConfig) -> list[dict[str, float]]:
    """Bundle 0 holds the replica; one bundle per worker follows, in rank order."""
    engine = replica_engine_config(config)
    return [{"CPU": REPLICA_CPUS}] + engine.parallel.worker_bundles(engine.device, engine.cpus_per_worker)
