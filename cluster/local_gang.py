"""A gang of one (tp = pp = 1, ``worker_process: in_process``): the worker runs in the engine's own
process, without Ray, for machines without Ray (bench/device_check.py) and one-process profiles.

The engine hands each step to one thread of its own (torch releases the GIL while it computes), so
the caller's event loop keeps going meanwhile. The same interface as ``Gang``, but a worker that
crashes takes the engine's process with it, and one that hangs cannot be replaced: served
replicas run their workers as actors (cluster/gang.py), which costs no speed here (BENCHMARKS.md)
and lets requests resume on a new worker.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from cluster.config import EngineConfig
from cluster.protocol import GangError
from cluster.worker import StepInput, Worker
from model.sampling import SampleOutput


class LocalGang:
    def __init__(self, config: EngineConfig, model_dir: str):
        if config.parallel.world_size != 1:
            raise ValueError(f"a local gang holds one worker, not tp x pp = {config.parallel.world_size}")
        self.broken: BaseException | None = None
        self.worker = Worker(0, config, model_dir)
        self.worker.load()
        self._steps = ThreadPoolExecutor(1, thread_name_prefix="shardserve-step")

    def init_cache(self, num_blocks: int) -> None:
        self.worker.init_cache(num_blocks)

    async def execute(self, step: StepInput) -> SampleOutput:
        if self.broken is not None:
            raise GangError(f"gang is broken: {self.broken}")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._steps, self.worker.execute, step)
        except Exception as e:  # an error inside the step: the model's state is unknown from here on
            self.broken = e
            raise GangError(f"the step failed: {e}") from e

    def restart(self, num_blocks: int, timeout_s: float) -> None:
        raise GangError("the worker runs in the replica's own process and cannot be replaced without it")

    async def check_health(self, timeout_s: float = 30.0) -> None:
        if self.broken is not None:
            raise GangError(f"gang is broken: {self.broken}")

    def shutdown(self) -> None:
        self._steps.shutdown(wait=False, cancel_futures=True)
        self.worker.shutdown()
