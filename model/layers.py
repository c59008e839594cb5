"""Megatron-style tensor-parallel layers.

Each layer is built at its per-rank size (names say which size: `output_size_per_partition`). Every
parameter carries a `weight_loader(param, source, shard_id) -> int` that reads only this rank's part of a
checkpoint tensor (`source.read(dim, start, length)`, see model/loader.py), copies it in, and returns how
many elements of `param` it filled, so the loader can prove every parameter was filled completely.
Collectives go through a `TPGroup`; they are skipped entirely when the group has one rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import ops


@runtime_checkable
class TPGroup(Protocol):
    rank: int
    size: int

    def all_reduce(self, x: Tensor) -> Tensor:  # sum over ranks; may work in place; returns the result
        ...

    def all_gather(self, x: Tensor, dim: int = -1) -> Tensor:  # concat in rank order along dim
        ...


class SingleGroup:
    """The one-rank group: collectives are identities."""

    rank = 0
    size = 1

    def all_reduce(self, x: Tensor) -> Tensor:
        return x

    def all_gather(self, x: Tensor, dim: int = -1) -> Tensor:
        return x


def divide(n: int, d: int) -> int:
    if n % d:
        raise ValueError(f"{n} is not divisible by {d}")
    return n // d


@dataclass(frozen=True)
class CheckpointRef:
    """Where (part of) a parameter lives in the checkpoint.

    `transpose`: the checkpoint stores the matrix as (in, out) (GPT-2 Conv1D). `narrow`: (dim, start, length)
    of the checkpoint tensor (after transposing) that holds this part (GPT-2's fused c_attn). `shard_id`
    tells fused layers which part this is ("q"/"k"/"v", or 0/1 for gate/up).
    """

    key: str
    shard_id: str | int | None = None
    transpose: bool = False
    narrow: tuple[int, int, int] | None = None


def _check_shape(source, expected: tuple[int, ...], what: str) -> None:
    if tuple(source.shape) != tuple(expected):
        raise ValueError(f"checkpoint tensor {source.key!r} has shape {tuple(source.shape)}, expected {tuple(expected)} for {what}")


def _attach(param: nn.Parameter | None, loader) -> None:
    if param is not None:
        param.weight_loader = loader


def load_replicated(param: Tensor, source, shard_id=None) -> int:
    """Every rank holds the whole tensor (norms, position embeddings)."""
    _check_shape(source, param.shape, "a replicated parameter")
    param.data.copy_(source.read())
    return param.numel()


def activation(name: str):
    if name == "silu":
        return F.silu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"hidden_act {name!r} is not supported")


def onednn_packing_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether linear weights on `device` in `dtype` can be packed for oneDNN (see OneDNNPackedLinear)."""
    return (
        torch.device(device).type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class DenseLinear:
    """x A^T + b from the layer's ``weight`` as loaded ([out, in], the checkpoint's layout)."""

    def apply(self, layer: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, layer.weight, bias)


class OneDNNPackedLinear:
    """x A^T + b from A re-laid once in oneDNN's blocked layout, and, for decode steps of one or
    two tokens, from A as loaded through the compiled GEMV (``decode_weight``).

    Why: on CPU, oneDNN's kernels on that layout use every torch thread even for one token and
    stream the weights faster than F.linear. SmolLM2's 30 layers on 2 cores
    (bench/bench_linear.py): 1.4-2.0x faster in float32 from 1 to 512 tokens per step, 1.1-1.35x
    in bfloat16. A step of one or two tokens is bound by streaming the weights, where oneDNN
    reaches ~20 GB/s of this machine's ~30; the GEMV (model/csrc/gemv.cpp) reaches 25-30, at the
    cost of keeping the loaded weight beside the packed one (EngineConfig.cpu_decode_kernel).
    """

    def __init__(self, weight: Tensor, keep_for_decode: bool):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        self.decode_weight = weight.detach() if keep_for_decode else None

    def apply(self, layer: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        if self.decode_weight is not None and ops.gemv_takes(x):
            return ops.gemv(x, self.decode_weight, bias)
        rows = x.shape[0]
        padded = step_rows(rows)
        if padded != rows:  # zero rows up to the size class; their outputs are dropped
            x = F.pad(x, (0, 0, 0, padded - rows))
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")[:rows]


def step_rows(rows: int) -> int:
    """The size class a matmul of `rows` rows runs as: exact up to 16, then rounded up to one of
    eight sizes per doubling (18, 20, ..., 32, 36, 40, ..., 64, 72, ..., 512), so at most 1/8 of
    it is padding; 56 classes up to 512 rows.

    Why: oneDNN builds and caches a kernel for every distinct row count it sees, ~0.9 MB each for
    SmolLM2's shapes; step sizes are as varied as prompt lengths, so unrounded they grow a worker's
    memory by ~1.8 GB by the time it has seen every size up to 512, and churn the cache after.
    """
    if rows <= 16:
        return rows
    step = 1 << ((rows - 1).bit_length() - 4)  # an eighth of the power of two below rows
    return -(-rows // step) * step


class _Linear(nn.Module):
    """A layer whose matmul runs through its ``method``: DenseLinear until ``pack_weight`` swaps in
    OneDNNPackedLinear (and drops ``weight``, so one copy of the weights is kept, not two)."""

    method: DenseLinear | OneDNNPackedLinear = DenseLinear()

    def pack_weight(self, keep_original: bool = False, keep_for_decode: bool = False) -> None:
        self.method = OneDNNPackedLinear(self.weight, keep_for_decode)
        if not keep_original:
            del self.weight


class ColumnParallelLinear(_Linear):
    """y = x A^T + b with A split by output rows: each rank computes its slice of y; no communication."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_partition = divide(output_size, tp.size)
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.output_size_per_partition, dtype=dtype), requires_grad=False) if bias else None
        _attach(self.weight, self.weight_loader)
        _attach(self.bias, self.weight_loader)

    def weight_loader(self, param: Tensor, source, shard_id=None) -> int:
        full = (self.output_size,) + tuple(param.shape[1:])
        _check_shape(source, full, type(self).__name__)
        n = self.output_size_per_partition
        param.data.copy_(source.read(0, self.tp.rank * n, n))
        return param.numel()

    def forward(self, x: Tensor) -> Tensor:
        return self.method.apply(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs (gate and up) in one matmul; shard_id is the index of the part."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, tp: TPGroup, dtype: torch.dtype):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, tp, dtype)

    def weight_loader(self, param: Tensor, source, shard_id=None) -> int:
        size = self.output_sizes[shard_id]
        _check_shape(source, (size,) + tuple(param.shape[1:]), f"part {shard_id} of {type(self).__name__}")
        n = divide(size, self.tp.size)
        offset = divide(sum(self.output_sizes[:shard_id]), self.tp.size)
        part = param.data.narrow(0, offset, n)
        part.copy_(source.read(0, self.tp.rank * n, n))
        return part.numel()


def kv_heads_per_partition(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds: split when tp divides them, one replicated head when they divide tp."""
    if num_kv_heads % tp_size == 0:
        return num_kv_heads // tp_size
    if tp_size % num_kv_heads == 0:
        return 1
    raise ValueError(f"tensor parallel size {tp_size} neither divides nor is a multiple of num_kv_heads {num_kv_heads}")


class QKVParallelLinear(_Linear):
    """Fused q/k/v projection. Query heads are split across ranks; KV heads are split when tp divides
    them and replicated (each rank holds the one KV head its query heads use) when they divide tp.
    Output per rank: [q (num_heads_per_partition * hd) | k (kv_size_per_partition) | v (same)]."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_heads_per_partition = divide(num_heads, tp.size)
        self.num_kv_heads_per_partition = kv_heads_per_partition(num_kv_heads, tp.size)
        if num_kv_heads % tp.size == 0:  # split: consecutive KV heads per rank
            self.kv_head_start = tp.rank * self.num_kv_heads_per_partition
        else:  # replicated: tp / num_kv_heads consecutive ranks share one KV head
            self.kv_head_start = tp.rank // (tp.size // num_kv_heads)
        self.q_size_per_partition = self.num_heads_per_partition * head_dim
        self.kv_size_per_partition = self.num_kv_heads_per_partition * head_dim
        self.output_size_per_partition = self.q_size_per_partition + 2 * self.kv_size_per_partition
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, hidden_size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.output_size_per_partition, dtype=dtype), requires_grad=False) if bias else None
        _attach(self.weight, self.weight_loader)
        _attach(self.bias, self.weight_loader)

    def forward(self, x: Tensor) -> Tensor:
        return self.method.apply(self, x, self.bias)

    def weight_loader(self, param: Tensor, source, shard_id=None) -> int:
        hd = self.head_dim
        if shard_id == "q":
            heads, first, offset, length = self.num_heads, self.tp.rank * self.num_heads_per_partition, 0, self.q_size_per_partition
        elif shard_id in ("k", "v"):
            heads, first, length = self.num_kv_heads, self.kv_head_start, self.kv_size_per_partition
            offset = self.q_size_per_partition + (0 if shard_id == "k" else self.kv_size_per_partition)
        else:
            raise ValueError(f"QKVParallelLinear shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        _check_shape(source, (heads * hd,) + tuple(param.shape[1:]), f"{shard_id} of QKVParallelLinear")
        part = param.data.narrow(0, offset, length)
        part.copy_(source.read(0, first * hd, length))
        return part.numel()


class RowParallelLinear(_Linear):
    """y = x A^T + b with A split by input columns: each rank holds a partial sum, all-reduced when tp > 1.
    Only rank 0 holds the bias, so it is added exactly once."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = divide(input_size, tp.size)
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False) if bias and tp.rank == 0 else None
        _attach(self.weight, self.weight_loader)
        _attach(self.bias, load_replicated)

    def weight_loader(self, param: Tensor, source, shard_id=None) -> int:
        _check_shape(source, (self.output_size, self.input_size), type(self).__name__)
        n = self.input_size_per_partition
        param.data.copy_(source.read(1, self.tp.rank * n, n))
        return param.numel()

    def forward(self, x: Tensor) -> Tensor:
        y = self.method.apply(self, x, self.bias)
        return self.tp.all_reduce(y) if self.tp.size > 1 else y


class _VocabParallel(nn.Module):
    """A (vocab, hidden) table split by vocab rows; vocab is padded up to a multiple of tp with zero rows."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.vocab_size_padded = -(-vocab_size // tp.size) * tp.size
        self.vocab_size_per_partition = self.vocab_size_padded // tp.size
        self.vocab_start = tp.rank * self.vocab_size_per_partition
        self.vocab_end = self.vocab_start + self.vocab_size_per_partition  # may run past vocab_size (padding)
        self.weight = nn.Parameter(torch.empty(self.vocab_size_per_partition, hidden_size, dtype=dtype), requires_grad=False)
        _attach(self.weight, self.weight_loader)

    def weight_loader(self, param: Tensor, source, shard_id=None) -> int:
        _check_shape(source, (self.vocab_size, self.hidden_size), type(self).__name__)
        n_real = max(0, min(self.vocab_end, self.vocab_size) - self.vocab_start)
        if n_real:
            param.data[:n_real].copy_(source.read(0, self.vocab_start, n_real))
        param.data[n_real:].zero_()
        return param.numel()


class VocabParallelEmbedding(_VocabParallel):
    def forward(self, ids: Tensor) -> Tensor:  # (T,) -> (T, hidden)
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill_(outside, 0)
        out = F.embedding(local, self.weight).masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(_VocabParallel):
    method = _Linear.method
    pack_weight = _Linear.pack_weight  # when tied, the embedding keeps the original

    def forward(self, hidden: Tensor) -> Tensor:  # (N, hidden) -> (N, vocab_size) float32, full vocab
        logits = self.method.apply(self, hidden, None)  # (N, vocab_size_per_partition)
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits, dim=-1)
        if self.vocab_size_padded != self.vocab_size:
            logits = logits[:, : self.vocab_size]
        return logits.float()


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)
        _attach(self.weight, load_replicated)

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(norm(residual + x), residual + x), in one pass on CPU; x and residual may be overwritten."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.normalized_shape = (hidden_size,)
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)
        _attach(self.weight, load_replicated)
        _attach(self.bias, load_replicated)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
