"""GPT-2: learned positions, pre-LayerNorm blocks, gelu_new MLP, LM head tied to the token embedding.

HF GPT-2 stores its projections as Conv1D, i.e. (in, out) matrices, and fuses q/k/v into one c_attn
tensor; `checkpoint_refs` describes both (transpose, and the q/k/v thirds of c_attn), so the same
tensor-parallel layers and loaders as Llama shard them. Keys are named without the "transformer." prefix;
the loader accepts checkpoints with or without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import AttentionMetadata, paged_attention
from model.config import ModelSpec
from model.shard import ShardInfo
from model.layers import (CheckpointRef, ColumnParallelLinear, LayerNorm, ParallelLMHead, QKVParallelLinear,
                          RowParallelLinear, TPGroup, VocabParallelEmbedding, activation, load_replicated)


class GPT2Attention(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.c_attn = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_heads, True, tp, dtype)
        self.c_proj = RowParallelLinear(spec.hidden_size, spec.hidden_size, True, tp, dtype)
        self.head_dim = spec.head_dim
        self.num_heads = self.c_attn.num_heads_per_partition
        self.scale = spec.head_dim ** -0.5

    def forward(self, x: Tensor, meta: AttentionMetadata, kv_cache: Tensor) -> Tensor:
        T, nh, hd = x.shape[0], self.num_heads, self.head_dim
        q, k, v = self.c_attn(x).view(T, 3 * nh, hd).split(nh, dim=1)  # each (T, nh, hd)
        return self.c_proj(paged_attention(q, k, v, kv_cache, meta, self.scale))


class GPT2MLP(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.c_fc = ColumnParallelLinear(spec.hidden_size, spec.intermediate_size, True, tp, dtype)
        self.c_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, True, tp, dtype)
        self.act = activation(spec.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.ln_1 = LayerNorm(spec.hidden_size, spec.norm_eps, dtype)
        self.attn = GPT2Attention(spec, tp, dtype)
        self.ln_2 = LayerNorm(spec.hidden_size, spec.norm_eps, dtype)
        self.mlp = GPT2MLP(spec, tp, dtype)

    def forward(self, h: Tensor, meta: AttentionMetadata, kv_cache: Tensor) -> Tensor:
        h = h + self.attn(self.ln_1(h), meta, kv_cache)
        return h + self.mlp(self.ln_2(h))


class GPT2ForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, shard: ShardInfo, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.spec, self.shard = spec, shard
        if self.shard.is_first:
            self.wte = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp, dtype)
            self.wpe = nn.Parameter(torch.empty(spec.max_position_embeddings, spec.hidden_size, dtype=dtype),
                                    requires_grad=False)  # replicated: small, and indexed by position
            self.wpe.weight_loader = load_replicated
        self.h = nn.ModuleList(GPT2Block(spec, tp, dtype) for _ in range(shard.num_layers))
        self.ln_f = LayerNorm(spec.hidden_size, spec.norm_eps, dtype) if self.shard.is_last else None
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, tp, dtype) if self.shard.is_last else None
        if self.shard.is_first and self.shard.is_last:
            self.lm_head.weight = self.wte.weight  # tied; the loader fills it once

    def forward(self, x: Tensor, positions: Tensor, meta: AttentionMetadata, kv_caches: list[Tensor]) -> Tensor:
        h = self.wte(x) + F.embedding(positions, self.wpe) if self.shard.is_first else x  # (T, hidden)
        for block, kv_cache in zip(self.h, kv_caches):
            h = block(h, meta, kv_cache)
        return self.ln_f(h) if self.shard.is_last else h

    def compute_logits(self, hidden: Tensor) -> Tensor:  # (N, hidden) -> (N, vocab_size) float32
        return self.lm_head(hidden)

    def checkpoint_refs(self, name: str) -> list[CheckpointRef]:
        """The checkpoint tensors (HF names without "transformer.") that fill parameter `name`."""
        if name in ("wte.weight", "lm_head.weight"):
            return [CheckpointRef("wte.weight")]
        if name == "wpe":
            return [CheckpointRef("wpe.weight")]
        if not name.startswith("h."):
            return [CheckpointRef(name)]  # ln_f.*
        _, local, rest = name.split(".", 2)  # h.{i}.{rest}
        key = f"h.{self.shard.layer_range[0] + int(local)}.{rest}"
        if rest.startswith("ln_"):
            return [CheckpointRef(key)]
        is_weight = rest.endswith(".weight")
        if rest.startswith("attn.c_attn."):  # fused (hidden, 3 hidden): q, k, v thirds of the output axis
            H = self.spec.hidden_size
            dim = 0  # after transposing a weight, and always for the bias, the output axis is 0
            return [CheckpointRef(key, s, transpose=is_weight, narrow=(dim, i * H, H)) for i, s in enumerate("qkv")]
        return [CheckpointRef(key, transpose=is_weight)]  # Conv1D weights are (in, out)
