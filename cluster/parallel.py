"""The parallel layout of one replica: tp x pp workers, which layers each stage holds, and who is who.

Ranks come from position in the gang, never from the environment:
``rank = stage * tp + tp_rank``, so a TP group is a run of consecutive ranks and
the pipeline neighbour of a worker is ``rank +/- tp``.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelSpec, check_tensor_parallel


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

    def coords(self, rank: int) -> tuple[int, int]:
        """(stage, tp_rank) of a global rank."""
        return divmod(rank, self.tp)
