"""A gang: the tp x pp Ray actors that together hold one copy of the model.

One placement-group bundle per worker. Inside a Serve replica the gang uses the
replica's own placement group (bundle 0 is the replica itself, so workers start
at ``bundle_offset=1``); elsewhere (the offline CLI, tests) it makes its own.
Ranks in a TP group that share a host talk through shared memory, everything
else through torch.distributed (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import asyncio
import logging

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.comm import ShmGroup
from cluster.config import EngineConfig
from cluster.protocol import GangError
from cluster.worker import StepInput, Worker
from model.sampling import SampleOutput

log = logging.getLogger(__name__)


def worker_options(device: str, cpus_per_worker: float) -> dict[str, float]:
    """A worker actor's resources, equal to its bundle. On cuda, num_cpus=0 is explicit: an actor
    that names any resource otherwise holds 1 CPU as well, which a GPU-only bundle cannot give."""
    if device == "cuda":
        return {"num_gpus": 1, "num_cpus": 0}
    return {"num_cpus": cpus_per_worker}


class Gang:
    def __init__(
        self,
        config: EngineConfig,
        model_dir: str,
        *,
        pg: PlacementGroup | None = None,
        bundle_offset: int = 0,
        ready_timeout_s: float = 120.0,
    ):
        self.config = config
        self.parallel = config.parallel
        self.broken: BaseException | None = None  # the first failure; a broken gang serves nothing until restarted
        world = self.parallel.world_size
        self._own_pg = pg is None
        if pg is None:
            bundles = self.parallel.worker_bundles(config.device, config.cpus_per_worker)
            pg = placement_group(bundles, strategy=self.parallel.placement_strategy)
            ready, _ = ray.wait([pg.ready()], timeout=ready_timeout_s)
            if not ready:
                remove_placement_group(pg)
                raise GangError(
                    f"could not reserve {world} worker bundles of {bundles[0]} "
                    f"(tp={self.parallel.tp} x pp={self.parallel.pp}) within {ready_timeout_s:.0f}s; "
                    f"cluster resources: {ray.cluster_resources()}"
                )
        self.pg = pg
        self.model_dir = model_dir
        self.bundle_offset = bundle_offset
        self.workers: list = []
        try:
            self._start_workers(ready_timeout_s)
        except Exception:
            self.shutdown()
            raise

    def _start_workers(self, ready_timeout_s: float, load_timeout_s: float | None = None) -> None:
        """One actor per rank in the placement group's bundles, wired together, weights loaded."""
        actor_cls = ray.remote(Worker)
        resources = worker_options(self.config.device, self.config.cpus_per_worker)
        self.workers = [
            actor_cls.options(
                **resources,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=self.bundle_offset + rank
                ),
            ).remote(rank, self.config, self.model_dir)
            for rank in range(self.parallel.world_size)
        ]
        self._wire(ready_timeout_s)
        ray.get([w.load.remote() for w in self.workers], timeout=load_timeout_s)

    def restart(self, num_blocks: int, timeout_s: float) -> None:
        """Replace every worker of a broken gang with a new one in the same bundles, with an empty KV
        cache of `num_blocks`. Blocking; raises GangError when the new gang is not ready in time."""
        self._kill_workers()  # a hung worker would hold its bundle (and its collective) forever
        try:
            self._start_workers(timeout_s, load_timeout_s=timeout_s)
            self.init_cache(num_blocks, timeout_s)
        except Exception as e:
            self._kill_workers()
            raise GangError(f"could not restart the gang: {e}") from e
        self.broken = None

    def _kill_workers(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []

    def _wire(self, timeout_s: float) -> None:
        nodes = ray.get([w.node_address.remote() for w in self.workers], timeout=timeout_s)
        ip, port = "", 0
        if self.parallel.world_size > 1:
            ip, port = ray.get(self.workers[0].start_store.remote())
        shm_names: list[str | None] = [None] * self.parallel.pp
        if self.parallel.tp > 1 and self.config.device == "cpu" and ShmGroup.supported():
            for stage in range(self.parallel.pp):
                ranks = self.parallel.stage_ranks(stage)
                if len({nodes[r][0] for r in ranks}) == 1:
                    shm_names[stage] = ray.get(self.workers[ranks[0]].create_shm_segment.remote())
        ray.get(
            [
                self.workers[rank].init_distributed.remote(ip, port, shm_names[stage])
                for stage in range(self.parallel.pp)
                for rank in self.parallel.stage_ranks(stage)
            ]
        )
        ray.get([w.release_shm_segment.remote() for w in self.workers])

    def init_cache(self, num_blocks: int, timeout_s: float | None = None) -> None:
        ray.get([w.init_cache.remote(num_blocks) for w in self.workers], timeout=timeout_s)

    async def execute(self, step: StepInput) -> SampleOutput:
        """Run one step on every worker; only the last stage's tp_rank 0 returns anything."""
        if self.broken is not None:
            raise GangError(f"gang is broken: {self.broken}")
        # Passed by value: a step is a few KB, and ray.put would cost more than sending it inline.
        refs = [w.execute.remote(step) for w in self.workers]
        try:
            results = await asyncio.gather(*refs)
        except Exception as e:  # a dead actor, or an error inside a step
            self.broken = e
            raise GangError(f"a worker failed during a step: {e}") from e
        return results[self.parallel.sampler_rank]

    async def check_health(self, timeout_s: float = 30.0) -> None:
        if self.broken is not None:
            raise GangError(f"gang is broken: {self.broken}")
        try:
            await asyncio.wait_for(asyncio.gather(*[w.ping.remote() for w in self.workers]), timeout_s)
        except Exception as e:
            self.broken = e
            raise GangError(f"a worker did not answer a health check: {e!r}") from e

    def shutdown(self) -> None:
        if self.broken is None:  # a broken gang may hang in a collective: just kill it
            try:
                ray.get([w.shutdown.remote() for w in self.workers], timeout=10)
            except Exception as e:  # dead or hung workers are killed below anyway
                log.debug("worker shutdown failed: %s", e)
        self._kill_workers()
        if self._own_pg and self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
