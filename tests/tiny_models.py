"""Tiny random-weight HF checkpoints for tests, and a minimal paged-KV driver for running our models.

Weights use a fixed seed and a large initializer_range (0.2 instead of HF's 0.02): with 0.02 a tiny
random model's logits are nearly flat (spreads ~1e-3), so greedy argmax can hinge on differences of the
size of fp32 rounding and parity tests would flake; at 0.2 the top logits are separated by O(0.1-1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.attention import AttentionMetadata, allocate_kv_cache, kv_cache_shape

SEED = 0
INIT_RANGE = 0.2


def _save(model_type: str, config: dict, out_dir) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(SEED)
    hf_config = AutoConfig.for_model(model_type, **config)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    # HF initializes biases to 0 and norm weights to 1, which would hide a bias added twice or a norm
    # weight applied to the wrong tensor; give them random values too.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, INIT_RANGE)
            elif "norm" in name or ".ln_" in name:
                param.normal_(1.0, INIT_RANGE)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_tiny_llama(out_dir, **overrides) -> Path:
    """A Llama (or, with model_type="qwen2"/"mistral", that family) of 4 heads / 2 KV heads, hidden 64."""
    config = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  initializer_range=INIT_RANGE, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  rope_theta=10000.0)
    config.update(overrides)
    return _save(config.pop("model_type"), config, out_dir)


def make_tiny_gpt2(out_dir, **overrides) -> Path:
    config = dict(vocab_size=509, n_embd=64, n_layer=3, n_head=4, n_positions=256, initializer_range=INIT_RANGE,
                  bos_token_id=0, eos_token_id=0)
    config.update(overrides)
    return _save("gpt2", config, out_dir)


class PagedRunner:
    """Drives a model shard through a paged KV cache the way an engine would (blocks handed out in order).

    step([(seq_id, new_token_ids), ...]) runs one forward over the batch (decodes, i.e. single new tokens
    of sequences that already have context, must come first) and returns each sequence's last-token
    logits (B, vocab) float32. With pipeline stages, pass all stage models in order.
    """

    def __init__(self, *stages, block_size: int = 4, num_blocks: int = 64, dtype=torch.float32, device="cpu"):
        self.stages, self.block_size, self.device = stages, block_size, device
        self.caches = [allocate_kv_cache(kv_cache_shape(m.spec, m.shard, num_blocks, block_size), dtype, device)
                       for m in stages]
        self.free_blocks = list(range(num_blocks))[::-1]  # hand out high ids first: padding (0) is never a real block
        self.blocks: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def step(self, batch: list[tuple[int, list[int]]]) -> torch.Tensor:
        tokens, positions, slots, query_lens, context_lens = [], [], [], [], []
        num_decodes = 0
        for seq_id, new in batch:
            start = self.lengths.get(seq_id, 0)
            if len(new) == 1 and start > 0:
                assert num_decodes == len(query_lens), "decodes must come first"
                num_decodes += 1
            blocks = self.blocks.setdefault(seq_id, [])
            for pos in range(start, start + len(new)):
                if pos // self.block_size >= len(blocks):
                    blocks.append(self.free_blocks.pop())
                slots.append(blocks[pos // self.block_size] * self.block_size + pos % self.block_size)
            tokens += new
            positions += range(start, start + len(new))
            query_lens.append(len(new))
            context_lens.append(start + len(new))
            self.lengths[seq_id] = start + len(new)
        width = max(len(self.blocks[s]) for s, _ in batch)
        table = [self.blocks[s] + [0] * (width - len(self.blocks[s])) for s, _ in batch]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device), query_lens=query_lens, context_lens=context_lens,
            block_tables=torch.tensor(table, device=self.device), num_decodes=num_decodes, block_size=self.block_size)
        x = torch.tensor(tokens, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        with torch.inference_mode():
            for model, caches in zip(self.stages, self.caches):
                x = model(x, pos, meta, caches)
            last = torch.tensor(query_lens, device=self.device).cumsum(0) - 1
            return self.stages[-1].compute_logits(x[last])
