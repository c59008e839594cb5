"""ModelSpec from HF configs, TP layout checks, and RoPE frequencies."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelSpec, check_tensor_parallel, rope_frequencies

LLAMA = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rope_theta=100000.0)


def test_llama_spec_fields():
    spec = ModelSpec.from_hf_config(LLAMA)
    assert (spec.family, spec.num_heads, spec.num_kv_heads, spec.head_dim) == ("llama", 9, 3, 64)
    assert spec.tie_word_embeddings and not spec.qkv_bias and not spec.o_bias
    assert spec.eos_token_ids == (2,) and spec.norm_eps == 1e-5 and spec.hidden_act == "silu"


def test_qwen2_has_qkv_bias_only_and_eos_list():
    spec = ModelSpec.from_hf_config({**LLAMA, "model_type": "qwen2", "eos_token_id": [151643, 151645]})
    assert spec.qkv_bias and not spec.o_bias
    assert spec.eos_token_ids == (151643, 151645)


def test_mistral_sliding_window_caps_context():
    spec = ModelSpec.from_hf_config({**LLAMA, "model_type": "mistral", "max_position_embeddings": 32768,
                                     "sliding_window": 4096})
    assert spec.max_position_embeddings == 4096


def test_gpt2_spec_fields():
    spec = ModelSpec.from_hf_config(dict(model_type="gpt2", vocab_size=50257, n_embd=768, n_layer=12, n_head=12,
                                         n_positions=1024, n_inner=None, eos_token_id=50256))
    assert (spec.family, spec.head_dim, spec.intermediate_size, spec.num_kv_heads) == ("gpt2", 64, 3072, 12)
    assert spec.tie_word_embeddings and spec.qkv_bias and spec.o_bias and spec.hidden_act == "gelu_new"


def test_unknown_model_type_refused():
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        ModelSpec.from_hf_config({"model_type": "bert"})


def test_from_pretrained_needs_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        ModelSpec.from_pretrained(tmp_path)


@pytest.mark.parametrize("tp", [1, 3])
def test_tensor_parallel_accepted(tp):
    check_tensor_parallel(ModelSpec.from_hf_config(LLAMA), tp)


def test_tensor_parallel_kv_replication_accepted():
    check_tensor_parallel(ModelSpec.from_hf_config({**LLAMA, "num_attention_heads": 8, "num_key_value_heads": 2,
                                                    "hidden_size": 512}), 4)


@pytest.mark.parametrize("cfg,tp,message", [
    ({}, 2, "tensor parallel size 2 must divide num_heads 9"),
    ({"num_attention_heads": 12, "num_key_value_heads": 3, "hidden_size": 768}, 2,
     "tensor parallel size 2 must divide num_kv_heads 3"),
    ({"num_attention_heads": 12, "num_key_value_heads": 4, "hidden_size": 768}, 6,
     "tensor parallel size 6 must divide num_kv_heads 4"),
    ({"num_attention_heads": 12, "num_key_value_heads": 12, "hidden_size": 768, "intermediate_size": 1000}, 3,
     "tensor parallel size 3 must divide intermediate_size 1000"),
])
def test_tensor_parallel_refused_with_numbers(cfg, tp, message):
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel(ModelSpec.from_hf_config({**LLAMA, **cfg}), tp)


def test_default_rope_frequencies():
    inv_freq, scaling = rope_frequencies(ModelSpec.from_hf_config(LLAMA))
    expected = 1.0 / (100000.0 ** (torch.arange(0, 64, 2).float() / 64))
    torch.testing.assert_close(inv_freq, expected)
    assert scaling == 1.0


def test_llama3_rope_old_and_new_config_formats_agree_with_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    base = {**LLAMA, "max_position_embeddings": 131072}
    base.pop("rope_theta")
    old = {**base, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}}
    new = {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}}
    f_old, _ = rope_frequencies(ModelSpec.from_hf_config(old))
    f_new, _ = rope_frequencies(ModelSpec.from_hf_config(new))
    hf = LlamaRotaryEmbedding(LlamaConfig(**{k: v for k, v in new.items() if k != "model_type"}))
    torch.testing.assert_close(f_old, f_new)
    torch.testing.assert_close(f_new, hf.inv_freq.float())
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2).float() / 64))
    assert not torch.allclose(f_new, plain)  # the scaling really changed the low frequencies
