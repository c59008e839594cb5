"""ShardInfo: which part of the model one rank holds (its pipeline stage's layers, its tensor-parallel slice)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardInfo:
    stage: int
    num_stages: int
    layer_range: tuple[int, int]  # [start, end) of the model's layers held by this stage
    tp_rank: int
    tp_size: int

    @property
    def is_first(self) -> bool:
        """The first stage embeds the token ids."""
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        """The last stage holds the final norm and the LM head."""
        return self.stage == self.num_stages - 1

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]
