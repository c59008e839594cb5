"""ModelSpec: the few numbers of a HF `config.json` that shardserve's models need, validated once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")  # SmolLM2 ships as model_type "llama"
GPT2_MODEL_TYPES = ("gpt2",)


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "llama" (Llama 2/3, Mistral, Qwen2, SmolLM2) or "gpt2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    hf_config: dict = field(compare=False, repr=False)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelSpec":
        model_type = cfg.get("model_type")
        if model_type in LLAMA_MODEL_TYPES:
            return cls._from_llama_config(cfg)
        if model_type in GPT2_MODEL_TYPES:
            return cls._from_gpt2_config(cfg)
        raise ValueError(
            f"model_type {model_type!r} is not supported; expected one of "
            f"{LLAMA_MODEL_TYPES + GPT2_MODEL_TYPES}"
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelSpec":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"model directory {model_dir} has no config.json")
        return cls.from_hf_config(json.loads(path.read_text()))

    @classmethod
    def _from_llama_config(cls, cfg: dict) -> "ModelSpec":
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        max_pos = cfg.get("max_position_embeddings", 2048)
        # Mistral v0.1 uses windowed attention; shardserve attends to the full context, which is only the
        # same computation while the context fits in the window, so the window caps the context length.
        window = cfg.get("sliding_window")
        if window and (cfg["model_type"] == "mistral" or cfg.get("use_sliding_window")):
            max_pos = min(max_pos, window)
        attention_bias = bool(cfg.get("attention_bias", False))
        is_qwen2 = cfg["model_type"] == "qwen2"
        return cls(
            family="llama",
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=max_pos,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            hidden_act=cfg.get("hidden_act", "silu"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,  # Qwen2 always has q/k/v biases and no o bias
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_as_id_tuple(cfg.get("eos_token_id")),
            hf_config=dict(cfg),
        )

    @classmethod
    def _from_gpt2_config(cls, cfg: dict) -> "ModelSpec":
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
            raise ValueError("gpt2 configs with scale_attn_by_inverse_layer_idx or reorder_and_upcast_attn are not supported")
        if cfg.get("scale_attn_weights") is False:
            raise ValueError("gpt2 config scale_attn_weights=False is not supported")
        hidden = cfg.get("n_embd", 768)
        heads = cfg.get("n_head", 12)
        return cls(
            family="gpt2",
            vocab_size=cfg.get("vocab_size", 50257),
            hidden_size=hidden,
            num_layers=cfg.get("n_layer", 12),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=cfg.get("n_inner") or 4 * hidden,
            max_position_embeddings=cfg.get("n_positions", 1024),
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            hidden_act=cfg.get("activation_function", "gelu_new"),
            tie_word_embeddings=True,  # GPT-2's LM head is always the token embedding
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            bos_token_id=cfg.get("bos_token_id", 50256),
            eos_token_ids=_as_id_tuple(cfg.get("eos_token_id", 50256)),
            hf_config=dict(cfg),
        )


def _as_id_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def check_tensor_parallel(spec: ModelSpec, tp: int) -> None:
    """Refuse a TP degree the model cannot be split by, naming the numbers (called at config time)."""
    if tp < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {tp}")
    if spec.num_heads % tp:
        raise ValueError(f"tensor parallel size {tp} must divide num_heads {spec.num_heads}")
    if spec.num_kv_heads % tp and tp % spec.num_kv_heads:
        raise ValueError(
            f"tensor parallel size {tp} must divide num_kv_heads {spec.num_kv_heads} (KV heads split) "
            f"or be a multiple of it (KV heads replicated)"
        )
    if spec.intermediate_size % tp:
        raise ValueError(f"tensor parallel size {tp} must divide intermediate_size {spec.intermediate_size}")


def rope_frequencies(spec: ModelSpec) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim // 2,) float32 and the cos/sin scaling factor for this model's RoPE.

    Plain RoPE is computed here; scaled variants (llama3, linear, yarn, ...) are delegated to the
    transformers reference implementation so both old (`rope_scaling`) and new (`rope_parameters`) configs
    mean exactly what they mean there.
    """
    import torch  # here, not at the top: the router and the k8s tools read ModelSpec without loading torch

    with torch.device("cpu"):  # real numbers even while the model is built on the meta device
        return _rope_frequencies(spec)


def _rope_frequencies(spec: ModelSpec) -> tuple[torch.Tensor, float]:
    import torch

    cfg = spec.hf_config
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        dim = spec.head_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS or rope_type == "dynamic":
        raise ValueError(f"rope type {rope_type!r} is not supported")
    hf_kwargs = {k: v for k, v in cfg.items() if k != "model_type"}
    hf_cfg = AutoConfig.for_model(cfg["model_type"], **hf_kwargs)
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


