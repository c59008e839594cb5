"""Loading only this rank's shard from safetensors: coverage, bytes, sharded checkpoints, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.config import ModelSpec
from model.layers import SingleGroup
from model.loader import build_model, load_model
from model.shard import ShardInfo
from tests.tiny_models import PagedRunner, make_tiny_gpt2, make_tiny_llama


class RankOnly:
    """Rank identity for loading; loading itself never communicates."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def all_reduce(self, x):
        raise AssertionError("loading must not communicate")

    all_gather = all_reduce


def _checkpoint(path):
    tensors = {}
    for f in path.glob("*.safetensors"):
        tensors.update(load_file(f))
    return tensors


def _load_all_shards(path, tp, pp):
    spec = ModelSpec.from_pretrained(path)
    bounds = [spec.num_layers * s // pp for s in range(pp + 1)]
    reports = []
    for stage in range(pp):
        for rank in range(tp):
            shard = ShardInfo(stage, pp, (bounds[stage], bounds[stage + 1]), rank, tp)
            reports.append(load_model(path, spec, shard, RankOnly(rank, tp), torch.float32, "cpu")[1])
    return reports


@pytest.mark.parametrize("maker,overrides", [
    (make_tiny_llama, {}),
    (make_tiny_llama, dict(tie_word_embeddings=True, num_key_value_heads=1)),
    (make_tiny_llama, dict(model_type="qwen2")),
    (make_tiny_gpt2, {}),
])
def test_every_checkpoint_tensor_is_used_across_ranks_and_stages(tmp_path, maker, overrides):
    path = maker(tmp_path, **overrides)
    keys = set(_checkpoint(path))
    reports = _load_all_shards(path, tp=2, pp=2)
    assert set().union(*(r.keys_read for r in reports)) == keys


def test_tp2_rank_reads_about_half(tmp_path):
    path = make_tiny_llama(tmp_path)
    tensors = _checkpoint(path)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    replicated = sum(t.numel() * t.element_size() for k, t in tensors.items() if "norm" in k)
    single = _load_all_shards(path, tp=1, pp=1)[0]
    rank0, rank1 = _load_all_shards(path, tp=2, pp=1)
    assert single.bytes_read == total
    for r in (rank0, rank1):  # sharded weights halve; only the (replicated) norm weights are read twice
        assert r.bytes_read == (total - replicated) // 2 + replicated


def test_sharded_index_checkpoint_loads_identically(tmp_path):
    from transformers import AutoModelForCausalLM

    single = make_tiny_llama(tmp_path / "single")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    spec = ModelSpec.from_pretrained(single)
    shard = ShardInfo(0, 1, (0, spec.num_layers), 0, 1)
    a, _ = load_model(single, spec, shard, SingleGroup(), torch.float32, "cpu")
    b, report = load_model(sharded, spec, shard, SingleGroup(), torch.float32, "cpu")
    assert set(report.keys_read) == set(index["weight_map"])
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name


def test_missing_key_is_named(tmp_path):
    path = make_tiny_llama(tmp_path)
    file = path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    spec = ModelSpec.from_pretrained(path)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(path, spec, ShardInfo(0, 1, (0, spec.num_layers), 0, 1), SingleGroup(), torch.float32, "cpu")


def test_gpt2_keys_without_transformer_prefix(tmp_path):
    path = make_tiny_gpt2(tmp_path / "a")
    spec = ModelSpec.from_pretrained(path)
    shard = ShardInfo(0, 1, (0, spec.num_layers), 0, 1)
    with safe_open(path / "model.safetensors", "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
    bare = tmp_path / "b"
    bare.mkdir()
    (bare / "config.json").write_text((path / "config.json").read_text())
    save_file({k.removeprefix("transformer."): t for k, t in load_file(path / "model.safetensors").items()},
              bare / "model.safetensors")
    a, _ = load_model(path, spec, shard, SingleGroup(), torch.float32, "cpu")
    b, _ = load_model(bare, spec, shard, SingleGroup(), torch.float32, "cpu")
    ids = [4, 8, 15, 16, 23, 42]
    torch.testing.assert_close(PagedRunner(a).step([(0, ids)]), PagedRunner(b).step([(0, ids)]), rtol=0, atol=0)


def test_stage_holds_only_its_parts(tmp_path):
    path = make_tiny_llama(tmp_path, tie_word_embeddings=True)
    spec = ModelSpec.from_pretrained(path)
    first = build_model(spec, ShardInfo(0, 2, (0, 1), 0, 1), SingleGroup(), torch.float32)
    last, report = load_model(path, spec, ShardInfo(1, 2, (1, 3), 0, 1), SingleGroup(), torch.float32, "cpu")
    assert first.lm_head is None and first.norm is None and len(first.layers) == 1
    assert last.embed_tokens is None and len(last.layers) == 2
    assert "model.embed_tokens.weight" in report.keys_read  # the tied LM head of the last stage
    assert not any(k.startswith("model.layers.0.") for k in report.keys_read)
    assert all(p.device.type == "cpu" for p in last.parameters())


def test_tensor_parallel_layout_refused_at_build(tmp_path):
    path = make_tiny_llama(tmp_path, num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    spec = ModelSpec.from_pretrained(path)
    with pytest.raises(ValueError, match="tensor parallel size 2 must divide num_kv_heads 3"):
        load_model(path, spec, ShardInfo(0, 1, (0, 3), 0, 2), RankOnly(0, 2), torch.float32, "cpu")
    with pytest.raises(ValueError, match="tensor parallel size 4 must divide num_heads 6"):
        build_model(spec, ShardInfo(0, 1, (0, 3), 0, 4), RankOnly(0, 4), torch.float32)
