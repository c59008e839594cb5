"""Build one (stage, tp rank) shard of a model on the meta device and fill it from safetensors.

Each parameter is allocated on the target device at its per-rank size and filled by its own
`weight_loader`, which reads through `safe_open(...).get_slice(key)` only the rows/columns this rank owns,
so a rank never materializes more than its shard (plus replicated norms). Every parameter must be filled
completely, and every checkpoint key it needs must exist; otherwise loading fails with the name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from model import cpu_kernels
from model.config import ModelSpec, check_tensor_parallel
from model.gpt2 import GPT2ForCausalLM
from model.layers import CheckpointRef, TPGroup, VocabParallelEmbedding, onednn_packing_available
from model.llama import LlamaForCausalLM
from model.shard import ShardInfo

INDEX_FILE = "model.safetensors.index.json"


@dataclass
class LoadReport:
    keys_read: list[str] = field(default_factory=list)  # checkpoint keys touched, each once
    bytes_read: int = 0  # bytes materialized from the checkpoint (its dtype), summed over reads


class TensorSource:
    """A checkpoint tensor seen through a safetensors slice; `read` materializes only the asked part.

    Coordinates are logical: after `transpose` (for (in, out) Conv1D matrices) and within `narrow`
    (a fused tensor's part), so layer loaders never see how the checkpoint lays the tensor out.
    """

    def __init__(self, key: str, tensor_slice, report: LoadReport, transpose: bool = False,
                 narrow: tuple[int, int, int] | None = None):
        self.key, self._slice, self._report, self._transpose = key, tensor_slice, report, transpose
        shape = list(tensor_slice.get_shape())
        if transpose:
            if len(shape) != 2:
                raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(shape)}; only 2-d tensors can be transposed")
            shape.reverse()
        self._offsets = [0] * len(shape)
        if narrow is not None:
            dim, start, length = narrow
            if start + length > shape[dim]:
                raise ValueError(f"checkpoint tensor {key!r} has {shape[dim]} entries on dim {dim}, need {start + length}")
            self._offsets[dim], shape[dim] = start, length
        self.shape = tuple(shape)

    def read(self, dim: int | None = None, start: int = 0, length: int | None = None) -> Tensor:
        index = [slice(o, o + n) for o, n in zip(self._offsets, self.shape)]
        if dim is not None:
            dim %= len(self.shape)
            length = self.shape[dim] - start if length is None else length
            if start < 0 or start + length > self.shape[dim]:
                raise ValueError(f"read of {self.key!r} dim {dim} [{start}, {start + length}) is outside its {self.shape[dim]} entries")
            index[dim] = slice(self._offsets[dim] + start, self._offsets[dim] + start + length)
        if self._transpose:
            index.reverse()
        t = self._slice[tuple(index)]
        self._report.bytes_read += t.numel() * t.element_size()
        return t.t() if self._transpose else t


def build_model(spec: ModelSpec, shard: ShardInfo, tp: TPGroup, dtype: torch.dtype) -> nn.Module:
    """The shard's module on the meta device (no memory); `load_model` allocates and fills it."""
    check_tensor_parallel(spec, shard.tp_size)
    if tp.size != shard.tp_size or tp.rank != shard.tp_rank:
        raise ValueError(f"TP group (rank {tp.rank} of {tp.size}) does not match shard (rank {shard.tp_rank} of {shard.tp_size})")
    start, end = shard.layer_range
    if not 0 <= start <= end <= spec.num_layers:
        raise ValueError(f"layer_range {shard.layer_range} is outside the model's {spec.num_layers} layers")
    if not 0 <= shard.stage < shard.num_stages:
        raise ValueError(f"stage {shard.stage} is outside num_stages {shard.num_stages}")
    families = {"llama": LlamaForCausalLM, "gpt2": GPT2ForCausalLM}
    if spec.family not in families:
        raise ValueError(f"model family {spec.family!r} is not one of {sorted(families)}")
    with torch.device("meta"):
        return families[spec.family](spec, shard, tp, dtype)


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """Checkpoint key -> the .safetensors file holding it (sharded index or every file in the directory)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: model_dir / name for key, name in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {model_dir} has no *.safetensors files")
    keys: dict[str, Path] = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys.update((key, path) for key in f.keys())
    return keys


def load_model(model_dir: str | Path, spec: ModelSpec, shard: ShardInfo, tp: TPGroup, dtype: torch.dtype,
               device: torch.device | str, decode_kernel: bool = True,
               progress: Callable[[int, int], None] | None = None) -> tuple[nn.Module, LoadReport]:  # fmt: skip
    """The shard, filled and, on CPU, packed for oneDNN; with decode_kernel (and the compiled kernels
    loaded) the loaded weights are kept too, for decode steps through the GEMV (layers.OneDNNPackedLinear).
    progress(done, total) is called after each parameter is filled."""
    model = build_model(spec, shard, tp, dtype)
    total = len(list(model.parameters()))
    files = checkpoint_files(model_dir)
    report = LoadReport()
    filled: dict[int, nn.Parameter] = {}  # id(meta parameter) -> loaded parameter
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def source(ref: CheckpointRef) -> TensorSource:
            key = next((k for k in (ref.key, "transformer." + ref.key) if k in files), None)
            if key is None:
                raise ValueError(f"checkpoint {model_dir} has no tensor {ref.key!r}")
            path = files[key]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            if key not in report.keys_read:
                report.keys_read.append(key)
            return TensorSource(key, handles[path].get_slice(key), report, ref.transpose, ref.narrow)

        for name, meta_param in model.named_parameters():  # tied parameters appear once
            param = nn.Parameter(torch.empty(meta_param.shape, dtype=meta_param.dtype, device=device), requires_grad=False)
            refs = model.checkpoint_refs(name)
            count = sum(meta_param.weight_loader(param, source(ref), ref.shard_id) for ref in refs)
            if count != param.numel():
                raise ValueError(f"parameter {name} got {count} of its {param.numel()} values from {[r.key for r in refs]}")
            filled[id(meta_param)] = param
            if progress is not None:
                progress(len(filled), total)
    for module in model.modules():  # swap in, keeping tied parameters tied
        for pname, p in module._parameters.items():
            if p is not None:
                module._parameters[pname] = filled[id(p)]
    if onednn_packing_available(device, dtype):
        pack_linear_weights(model, keep_for_decode=decode_kernel and cpu_kernels.available())
    return model.eval(), report


def pack_linear_weights(model: nn.Module, keep_for_decode: bool = False) -> None:
    """Re-lay every linear weight (and the LM head) for oneDNN; see layers.OneDNNPackedLinear for why."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, VocabParallelEmbedding)}
    for module in model.modules():
        if hasattr(module, "pack_weight"):
            module.pack_weight(keep_original=id(module.weight) in embeddings, keep_for_decode=keep_for_decode)
