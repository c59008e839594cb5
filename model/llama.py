"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2): RMSNorm, RoPE, GQA, SwiGLU.

One pipeline stage of it (a `ShardInfo`): the layers in its `layer_range`, the embedding only on the first stage, the final
norm and LM head only on the last. The KV cache, positions and attention metadata come in as arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model import ops
from model.attention import AttentionMetadata, paged_attention
from model.config import ModelSpec, rope_frequencies
from model.shard import ShardInfo
from model.layers import (CheckpointRef, MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RMSNorm,
                          RowParallelLinear, TPGroup, VocabParallelEmbedding, activation)


class RotaryEmbedding:
    """cos/sin for the positions of a step, computed once per step and shared by all layers
    (sin signed for the half-split rotation of ops.rotary)."""

    def __init__(self, spec: ModelSpec):
        inv_freq, self.attention_scaling = rope_frequencies(spec)  # CPU float32, even under a meta build
        self.inv_freq = inv_freq

    def __call__(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # (T, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_scaling != 1.0:
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        cos = torch.cat((cos, cos), -1).to(dtype)[:, None, :]  # (T, 1, hd)
        sin = torch.cat((-sin, sin), -1).to(dtype)[:, None, :]
        return cos, sin


class LlamaAttention(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads,
                                          spec.qkv_bias, tp, dtype)
        self.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, spec.o_bias, tp, dtype)
        self.head_dim = spec.head_dim
        self.num_heads = self.qkv_proj.num_heads_per_partition
        self.num_kv_heads = self.qkv_proj.num_kv_heads_per_partition
        self.scale = spec.head_dim ** -0.5

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata, kv_cache: Tensor) -> Tensor:
        T, nh, nkv, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # (T, (nh + 2 nkv) hd)
        qk = ops.rotary(qkv[:, : (nh + nkv) * hd].view(T, nh + nkv, hd), cos, sin)  # q and k rotated together
        v = qkv[:, (nh + nkv) * hd :].view(T, nkv, hd)
        o = paged_attention(qk[:, :nh], qk[:, nh:], v, kv_cache, meta, self.scale)  # (T, nh hd)
        return self.o_proj(o)


class LlamaMLP(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        size = spec.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(spec.hidden_size, [size, size], spec.mlp_bias, tp, dtype)
        self.down_proj = RowParallelLinear(size, spec.hidden_size, spec.mlp_bias, tp, dtype)
        self.act = activation(spec.hidden_act)
        self.is_silu = spec.hidden_act == "silu"

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up_proj(x)  # (T, 2 intermediate / tp): gate, then up
        if self.is_silu:
            return self.down_proj(ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps, dtype)
        self.self_attn = LlamaAttention(spec, tp, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.norm_eps, dtype)
        self.mlp = LlamaMLP(spec, tp, dtype)

    def forward(self, h: Tensor, residual: Tensor | None, cos: Tensor, sin: Tensor, meta: AttentionMetadata,
                kv_cache: Tensor) -> tuple[Tensor, Tensor]:
        """h: the previous layer's output before its residual add; residual: the sum so far (None at the start).

        Each residual add happens inside the next norm, so both run as one pass (RMSNorm.add_forward).
        """
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm.add_forward(h, residual)
        h = self.self_attn(h, cos, sin, meta, kv_cache)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, shard: ShardInfo, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.spec, self.shard = spec, shard
        self.rotary = RotaryEmbedding(spec)
        self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, tp, dtype) if self.shard.is_first else None
        self.layers = nn.ModuleList(LlamaDecoderLayer(spec, tp, dtype) for _ in range(shard.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.norm_eps, dtype) if self.shard.is_last else None
        self.lm_head = ParallelLMHead(spec.vocab_size, spec.hidden_size, tp, dtype) if self.shard.is_last else None
        if self.shard.is_first and self.shard.is_last and spec.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # one tensor; the loader fills it once

    def forward(self, x: Tensor, positions: Tensor, meta: AttentionMetadata, kv_caches: list[Tensor]) -> Tensor:
        h = self.embed_tokens(x) if self.shard.is_first else x  # (T, hidden)
        cos, sin = self.rotary(positions, h.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, cos, sin, meta, kv_cache)
        if residual is None:  # a stage without layers
            return self.norm(h) if self.shard.is_last else h
        return self.norm.add_forward(h, residual)[0] if self.shard.is_last else h + residual

    def compute_logits(self, hidden: Tensor) -> Tensor:  # (N, hidden) -> (N, vocab_size) float32
        return self.lm_head(hidden)

    def checkpoint_refs(self, name: str) -> list[CheckpointRef]:
        """The checkpoint tensors (HF names) that fill parameter `name` of this stage."""
        if name == "embed_tokens.weight":
            return [CheckpointRef("model.embed_tokens.weight")]
        if name == "norm.weight":
            return [CheckpointRef("model.norm.weight")]
        if name == "lm_head.weight":
            key = "model.embed_tokens.weight" if self.spec.tie_word_embeddings else "lm_head.weight"
            return [CheckpointRef(key)]
        _, local, rest = name.split(".", 2)  # layers.{i}.{rest}
        prefix = f"model.layers.{self.shard.layer_range[0] + int(local)}."
        module, _, kind = rest.rpartition(".")  # kind: weight or bias
        if module == "self_attn.qkv_proj":
            return [CheckpointRef(f"{prefix}self_attn.{s}_proj.{kind}", s) for s in ("q", "k", "v")]
        if module == "mlp.gate_up_proj":
            return [CheckpointRef(f"{prefix}mlp.{p}_proj.{kind}", i) for i, p in enumerate(("gate", "up"))]
        return [CheckpointRef(prefix + rest)]
