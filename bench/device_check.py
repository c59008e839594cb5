"""The engine on one accelerator, without Ray: parity with transformers, decode speed against memory
bandwidth, and batched throughput. Made for a lent GPU machine (torch with CUDA, no Ray); runs on
CPU too, with a tiny model, which is how `make test` keeps it working.

One script, bounded in time, three parts (the engine with tp = pp = 1 holds its worker in-process,
cluster/local_gang.py, so nothing here needs Ray):
  1. parity: a small random Llama (bf16 on CUDA, fp32 on CPU), greedy tokens of shardserve and of
     transformers generate(do_sample=False) on the same device and dtype, token for token, and the
     largest logprob difference;
  2. decode: a random-weight model of Llama-3-8B's shape (--model-shape llama3-8b; "tiny" on CPU)
     built on the device and saved once, batch-1 decode tokens/s, and the share of the memory
     bandwidth measured in the same run (weights read per token x tok/s / bandwidth);
  3. throughput: 32 and 128 requests at once (prompt 128, output 128 tokens), output tokens/s.

    python bench/device_check.py --device cuda --out-json device.json       # on the lent machine
    python bench/device_check.py --device cpu --model-shape tiny            # anywhere
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from deployments.bench.bandwidth import read_bandwidth_gbs  # noqa: E402

SHAPES = {
    # name: LlamaConfig fields
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024),
}  # fmt: skip


def build_model(shape: str, dtype: torch.dtype, device: str, out: Path) -> Path:
    """A random-weight Llama of this shape, made on the device (no download) and saved with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_tokenizer import save_tiny_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    save_tiny_tokenizer(out, min(config.vocab_size, 320))  # requests are token ids; the engine wants one
    del model
    return out


def engine(model_dir: Path, device: str, dtype: str, kv_gib: float):
    from cluster.config import EngineConfig
    from cluster.engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(model_dir), device=device, dtype=dtype, kv_cache_memory_gib=kv_gib,
                                  worker_process="in_process",
                                  max_num_seqs=128, max_num_batched_tokens=4096 if device == "cuda" else 512))  # fmt: skip


async def stream(eng, prompt: list[int], max_tokens: int, logprobs: int | None = None) -> tuple[list[int], list[float], list[float]]:
    """(tokens, logprobs, arrival times) of one greedy request."""
    from cluster.protocol import GenerateRequest
    from model.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    tokens, lps, times = [], [], []
    async for out in eng.generate(GenerateRequest(prompt, params)):
        tokens += out.token_ids
        lps += [lp.logprob for lp in out.logprobs or []]
        times.append(time.perf_counter())
    return tokens, lps, times


def parity(device: str, dtype: torch.dtype, work: Path, new_tokens: int = 16) -> dict:
    from transformers import AutoModelForCausalLM

    shape = "small" if device == "cuda" else "tiny"
    model_dir = build_model(shape, dtype, device, work / "parity")
    prompts = [[5, 17, 42, 99, 3], list(range(10, 47)), [7] * 9]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None
    want = []
    for ids in prompts:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                              device=device), do_sample=False, max_new_tokens=new_tokens, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
        new = out.sequences[0, len(ids) :].tolist()
        want.append((new, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, new)]))
    del hf
    eng = engine(model_dir, device, str(dtype).removeprefix("torch."), kv_gib=0.25)
    try:

        async def run_all():
            return await asyncio.gather(*(stream(eng, p, new_tokens, logprobs=1) for p in prompts))

        got = asyncio.run(run_all())
    finally:
        asyncio.run(eng.shutdown())
    same = [next((i for i, (a, b) in enumerate(zip(g[0], w[0])) if a != b), new_tokens) for g, w in zip(got, want)]
    # Compare logprobs only while the tokens agree (after a divergence the contexts differ).
    diffs = [abs(a - b) for g, w, n in zip(got, want, same) for a, b in zip(g[1][:n], w[1][:n])]
    return {"shape": shape, "tokens_per_prompt": new_tokens, "agreeing_prefix": same,
            "all_equal": all(n == new_tokens for n in same), "max_logprob_diff": max(diffs) if diffs else None}  # fmt: skip


def speed(device: str, dtype: torch.dtype, shape: str, work: Path, deadline: float) -> dict:
    model_dir = build_model(shape, dtype, device, work / shape)
    weight_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))  # read once per decode step
    bandwidth = read_bandwidth_gbs(device, nbytes=1 << 30)
    eng = engine(model_dir, device, str(dtype).removeprefix("torch."), kv_gib=8.0 if device == "cuda" else 0.25)
    result = {"shape": shape, "weight_bytes": weight_bytes, "read_bandwidth_gbs": bandwidth}
    try:

        async def main():
            prompt = list(range(100, 228))
            await stream(eng, prompt, 8)  # warm-up
            _, _, times = await stream(eng, prompt, 128)
            rate = (len(times) - 1) / (times[-1] - times[0])
            result["decode_tok_s"] = rate
            result["bandwidth_share"] = weight_bytes * rate / (bandwidth * 1e9)
            for n in (32, 128):
                if time.monotonic() > deadline:
                    result[f"concurrent_{n}"] = "skipped: past the time bound"
                    continue
                t0 = time.perf_counter()
                outs = await asyncio.gather(*(stream(eng, [100 + i] + prompt[1:], 128) for i in range(n)))
                result[f"concurrent_{n}_tok_s"] = sum(len(o[0]) for o in outs) / (time.perf_counter() - t0)

        asyncio.run(main())
    finally:
        asyncio.run(eng.shutdown())
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--model-shape", default=None, choices=sorted(SHAPES), help="decode/throughput model (default: "
                    "llama3-8b on cuda, tiny on cpu)")  # fmt: skip
    ap.add_argument("--max-seconds", type=float, default=420.0, help="later parts are skipped past this")
    ap.add_argument("--out-json", default=None)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    shape = args.model_shape or ("llama3-8b" if args.device == "cuda" else "tiny")
    deadline = time.monotonic() + args.max_seconds
    work = Path(tempfile.mkdtemp(prefix="shardserve-device-"))
    results: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                     "torch": torch.__version__, "dtype": str(dtype)}  # fmt: skip
    try:
        results["parity"] = parity(args.device, dtype, work)
        print(json.dumps(results["parity"]), flush=True)
        results["speed"] = speed(args.device, dtype, shape, work, deadline)
        print(json.dumps(results["speed"]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.out_json:
            Path(args.out_json).write_text(json.dumps(results, indent=2))
    return 0 if results["parity"]["all_equal"] or args.device == "cuda" else 1


if __name__ == "__main__":
    sys.exit(main())
