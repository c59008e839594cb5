"""The parallel layout of one replica: tp x pp workers, which layers each stage holds, and who is who.

Ranks come from position in the gang, never from the environment:
``rank = stage * tp + tp_rank``, so a TP group is a run of consecutive ranks and
the pipeline neighbour of a worker is ``rank +/- tp``. This module is the only
place that knows that arithmetic: ``ParallelConfig.plan(rank)`` hands each rank
its ``RankPlan``, which the worker, the loader, KV sizing, gang wiring and the
Kubernetes fit check read.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelSpec, check_tensor_parallel
from model.shard import ShardInfo


@dataclass(frozen=True)
class RankPlan:
    """One worker's place in the gang."""

    rank: int
    shard: ShardInfo  # what it holds: its stage's layers and its TP slice
    prev_rank: int | None  # same tp_rank one stage earlier: where its hidden states come from
    next_rank: int | None  # same tp_rank one stage later: where its hidden states go


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    layer_split: tuple[int, ...] | None = None  # layers per stage; None = as even as possible

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tp}")
        if self.pp < 1:
            raise ValueError(f"pipeline_parallel_size must be >= 1, got {self.pp}")
        if self.layer_split is not None:
            if len(self.layer_split) != self.pp:
                raise ValueError(
                    f"layer_split has {len(self.layer_split)} entries but pipeline_parallel_size is {self.pp}"
                )
            if any(n < 1 for n in self.layer_split):
                raise ValueError(f"layer_split entries must be >= 1, got {list(self.layer_split)}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def validate(self, spec: ModelSpec) -> None:
        """Refuse a layout the model cannot take, at config time, naming the numbers."""
        check_tensor_parallel(spec, self.tp)
        if self.pp > spec.num_layers:
            raise ValueError(
                f"pipeline_parallel_size={self.pp} is more than the model's {spec.num_layers} layers"
            )
        if self.layer_split is not None and sum(self.layer_split) != spec.num_layers:
            raise ValueError(
                f"layer_split {list(self.layer_split)} sums to {sum(self.layer_split)}, "
                f"but the model has {spec.num_layers} layers"
            )

    def layer_ranges(self, num_layers: int) -> list[tuple[int, int]]:
        """[start, end) layer range per stage; the first stages take the remainder of an uneven split."""
        if self.layer_split is not None:
            sizes = list(self.layer_split)
        else:
            base, extra = divmod(num_layers, self.pp)
            sizes = [base + (1 if s < extra else 0) for s in range(self.pp)]
        ranges, start = [], 0
        for n in sizes:
            ranges.append((start, start + n))
            start += n
        return ranges

    def rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def stage_ranks(self, stage: int) -> tuple[int, ...]:
        """The TP group of a stage, in tp_rank order."""
        return tuple(self.rank(stage, t) for t in range(self.tp))

    @property
    def sampler_rank(self) -> int:
        """The last stage's tp_rank 0: the one worker that samples and returns the tokens."""
        return self.rank(self.pp - 1, 0)

    def plan(self, rank: int, num_layers: int) -> RankPlan:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the gang of {self.world_size}")
        stage, tp_rank = divmod(rank, self.tp)
        shard = ShardInfo(stage, self.pp, self.layer_ranges(num_layers)[stage], tp_rank, self.tp)
        return RankPlan(
            rank=rank,
            shard=shard,
            prev_rank=self.rank(stage - 1, tp_rank) if stage > 0 else None,
            next_rank=self.rank(stage + 1, tp_rank) if stage < self.pp - 1 else None,
        )

    def plans(self, num_layers: int) -> list[RankPlan]:
        return [self.plan(rank, num_layers) for rank in range(self.world_size)]

    # -- placement -------------------------------------------------------------------
    @property
    def placement_strategy(self) -> str:
        # A TP group must share a host; pipeline stages may spread over hosts.
        return "STRICT_PACK" if self.pp == 1 else "PACK"

    def worker_bundles(self, device: str, cpus_per_worker: float) -> list[dict[str, float]]:
        """One placement-group bundle per worker, in rank order."""
        bundle = {"GPU": 1.0} if device == "cuda" else {"CPU": float(cpus_per_worker)}
        return [dict(bundle) for _ in range(self.world_size)]
