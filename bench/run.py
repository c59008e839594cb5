"""shardserve vs transformers on this machine, side by side in one run (SmolLM2-135M-Instruct).

Measures, per dtype:
  * read bandwidth of this machine, now (sum over a 512 MB float32 tensor, best of a few);
  * batch-1 decode tokens/s: shardserve (each TP x PP layout) vs transformers generate(do_sample=False),
    decode only (time between the first and last streamed token for shardserve; for transformers,
    time of N new tokens minus time of 1 new token), and the share of read bandwidth that implies
    (weight bytes read per token x tok/s / bandwidth);
  * throughput on each of two mixed workloads (fixed-seed random prompts of mixed length, mixed output
    length; "short" answers where prefill dominates, "long" ones where decode does):
    shardserve with all requests submitted at once; transformers one request at a time (estimated
    from a subset, stated in the output); transformers in padded static batches (left padding,
    attention mask, max_new_tokens = the batch's longest; only useful tokens counted).

The engine's workers are shut down before transformers is timed, so the two never compete for
cores. transformers runs in this driver process with torch threads = all cores.

    .venv/bin/python bench/run.py [--dtype float32,bfloat16] [--layouts 1x1,3x1,1x2] [--quick] [--out-json F]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from deployments.bench.bandwidth import read_bandwidth_gbs as measure_read_bandwidth  # noqa: E402

CORES = os.cpu_count() or 1
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Mix:
    """One throughput workload: prompt and output lengths drawn uniformly from inclusive ranges."""

    name: str
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]


@dataclass(frozen=True)
class Settings:
    num_requests: int  # each throughput workload's request count (all submitted at once)
    mixes: tuple[Mix, ...]
    decode_prompt: int  # batch-1 decode: prompt length
    decode_tokens: int  # batch-1 decode: new tokens
    decode_repeats: int  # best of this many
    sequential_subset: int  # transformers one-at-a-time: requests actually timed
    static_batch: int  # transformers padded static batch size


# Two mixes: "short" answers (outputs shorter than prompts, so prefill dominates) and "long" ones
# (outputs up to 128 tokens, as chat answers run). Sized so a default run of both dtypes and three
# layouts stays within ~10 minutes on 2 cores (transformers' padded batches and one-at-a-time runs
# dominate); --quick runs one small mix.
FULL = Settings(32, (Mix("short", (16, 128), (8, 32)), Mix("long", (16, 256), (16, 128))), 32, 32, 2, 3, 32)
QUICK = Settings(32, (Mix("short", (16, 64), (8, 16)),), 16, 16, 1, 2, 32)


# -- measurements shared by both sides ------------------------------------------------------
def read_bandwidth_gbs() -> float:
    torch.set_num_threads(CORES)
    return measure_read_bandwidth()


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied embedding counts once,
    as the LM head); an untied input embedding contributes only the one row the lookup reads."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    return total


def workload(num_requests: int, mix: Mix, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request; fixed seed, ids drawn from the lower vocabulary."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(num_requests):
        n = rng.randint(*mix.prompt_len)
        reqs.append(([rng.randrange(100, min(vocab, 40000)) for _ in range(n)], rng.randint(*mix.output_len)))
    return reqs


# -- shardserve ----------------------------------------------------------------------------
async def _engine_stream(engine, prompt, max_tokens) -> tuple[int, float, float]:
    """(tokens, time of first token, time of last token)."""
    from cluster.protocol import GenerateRequest
    from model.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    n, first, last = 0, None, None
    async for out in engine.generate(GenerateRequest(prompt, params)):
        now = time.perf_counter()
        n += len(out.token_ids)
        if first is None:
            first = now
        last = now
    return n, first, last


async def bench_engine(model_dir, tp: int, pp: int, dtype: str, settings: Settings, workloads: dict, decode_prompt) -> dict:
    from cluster.config import EngineConfig
    from cluster.engine import LLMEngine

    t0 = time.perf_counter()
    engine = LLMEngine(
        EngineConfig(
            model=str(model_dir),
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            dtype=dtype,
            max_num_seqs=32,
            max_num_batched_tokens=512,
        )
    )
    try:
        startup = time.perf_counter() - t0
        await _engine_stream(engine, decode_prompt, 4)  # warm-up
        rates = []
        for _ in range(settings.decode_repeats):
            n, first, last = await _engine_stream(engine, decode_prompt, settings.decode_tokens)
            rates.append((n - 1) / (last - first))
        throughput = {}
        for name, reqs in workloads.items():
            t0 = time.perf_counter()
            results = await asyncio.gather(*(_engine_stream(engine, p, m) for p, m in reqs))
            wall = time.perf_counter() - t0
            tokens = sum(r[0] for r in results)
            assert tokens == sum(m for _, m in reqs), "every request must produce exactly max_tokens"
            throughput[name] = {"tok_s": tokens / wall, "wall_s": wall, "tokens": tokens}
        return {"startup_s": startup, "decode_tok_s": max(rates), "throughput": throughput}
    finally:
        await engine.shutdown()


# -- transformers --------------------------------------------------------------------------
def _hf_generate(model, input_ids, attention_mask, new_tokens: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    dt = time.perf_counter() - t0
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return dt


def _single(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One unpadded request as transformers takes it: input ids and its attention mask."""
    return torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)


def bench_transformers(model, settings: Settings, workloads: dict, decode_prompt) -> dict:
    torch.set_num_threads(CORES)

    ids, mask = _single(decode_prompt)
    _hf_generate(model, ids, mask, 4)  # warm-up
    rates = []
    for _ in range(settings.decode_repeats):
        t_prefill = min(_hf_generate(model, ids, mask, 1) for _ in range(2))
        t_all = _hf_generate(model, ids, mask, settings.decode_tokens)
        rates.append((settings.decode_tokens - 1) / (t_all - t_prefill))

    mixes = {name: _hf_throughput(model, settings, reqs) for name, reqs in workloads.items()}
    return {"decode_tok_s": max(rates), "mixes": mixes}


def _hf_throughput(model, settings: Settings, reqs) -> dict:
    # One at a time: time a subset spread over the prompt lengths, and rate the whole by its tok/s.
    order = sorted(range(len(reqs)), key=lambda i: len(reqs[i][0]))
    k = settings.sequential_subset
    subset = [order[(2 * j + 1) * len(order) // (2 * k)] for j in range(k)]
    seq_time = seq_tokens = 0
    for i in subset:
        prompt, m = reqs[i]
        seq_time += _hf_generate(model, *_single(prompt), m)
        seq_tokens += m

    # Padded static batches, left padding, in arrival order; useful tokens only.
    static_time = 0.0
    for s in range(0, len(reqs), settings.static_batch):
        chunk = reqs[s : s + settings.static_batch]
        width = max(len(p) for p, _ in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (p, _) in enumerate(chunk):
            input_ids[row, width - len(p) :] = torch.tensor(p)
            attention[row, width - len(p) :] = 1
        static_time += _hf_generate(model, input_ids, attention, max(m for _, m in chunk))
    useful = sum(m for _, m in reqs)
    return {
        "sequential_tok_s": seq_tokens / seq_time,
        "sequential_subset_prompt_lens": [len(reqs[i][0]) for i in subset],
        "static_tok_s": useful / static_time,
        "static_wall_s": static_time,
    }


# -- driver --------------------------------------------------------------------------------
def random_tp2_model() -> Path:
    """SmolLM2's shape (hidden 576, 30 layers, vocab 49152, tied) with 8 heads / 4 KV heads, random weights."""
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tiny_tokenizer import save_tiny_tokenizer

    path = Path(tempfile.mkdtemp(prefix="shardserve-bench-"))
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    save_tiny_tokenizer(path, 320)  # the engine needs a tokenizer; the benchmark sends token ids
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float32,bfloat16", help="comma list of float32,bfloat16")
    ap.add_argument("--layouts", default=None, help="comma list of TPxPP (default 1x1,3x1,1x2; 1x1,2x1 for random-tp2)")
    ap.add_argument(
        "--model",
        default="smollm2",
        choices=["smollm2", "random-tp2"],
        help="smollm2: the bundled model; random-tp2: random weights of SmolLM2's size with 8 heads / 4 KV heads, "
        "so that tp=2 fits (speed does not depend on the weights)",
    )
    ap.add_argument("--quick", action="store_true", help="shorter prompts/outputs and fewer repeats")
    ap.add_argument("--out-json", help="write all results here")
    args = ap.parse_args(argv)
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        if d not in TORCH_DTYPES:
            ap.error(f"unknown dtype {d!r}")
    layout_arg = args.layouts or ("1x1,2x1" if args.model == "random-tp2" else "1x1,3x1,1x2")
    layouts = [tuple(int(x) for x in l.lower().split("x")) for l in layout_arg.split(",") if l.strip()]
    settings = QUICK if args.quick else FULL

    import logging

    import ray
    from transformers import AutoModelForCausalLM

    from model import cpu_kernels
    from model.sources import resolve_model

    logging.getLogger("transformers").setLevel(logging.ERROR)
    model_dir = resolve_model(None) if args.model == "smollm2" else random_tp2_model()
    bandwidth = read_bandwidth_gbs()
    print(f"read bandwidth: {bandwidth:.1f} GB/s ({CORES} cores)", flush=True)

    ray.init(num_cpus=CORES, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    results: dict = {
        "machine": {"cores": CORES, "platform": platform.platform(), "torch": torch.__version__},
        "settings": dataclasses.asdict(settings),
        "model": args.model,
        "read_bandwidth_gbs": bandwidth,
        # the workers decide for themselves, on the same machine and environment, so the same way
        "cpu_kernels": cpu_kernels.load(),
        "loadavg_1m_at_start": os.getloadavg()[0],
        "dtypes": {},
    }
    try:
        for dtype in dtypes:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=TORCH_DTYPES[dtype]).eval()
            model.generation_config.eos_token_id = None
            wbytes = weight_bytes_per_token(model)
            workloads = {m.name: workload(settings.num_requests, m, model.config.vocab_size) for m in settings.mixes}
            rng = random.Random(7)
            decode_prompt = [rng.randrange(100, 40000) for _ in range(settings.decode_prompt)]
            entry = {"weight_bytes_per_token": wbytes, "engine": {}}
            for tp, pp in layouts:  # engines first, each shut down before the next and before transformers
                print(f"[{dtype}] shardserve tp={tp} pp={pp} ...", flush=True)
                entry["engine"][f"{tp}x{pp}"] = asyncio.run(bench_engine(model_dir, tp, pp, dtype, settings, workloads, decode_prompt))
                entry["engine"][f"{tp}x{pp}"]["loadavg_1m_after"] = os.getloadavg()[0]
                print(f"  {entry['engine'][f'{tp}x{pp}']}", flush=True)
            time.sleep(1.0)  # let the killed workers' processes exit
            print(f"[{dtype}] transformers ...", flush=True)
            entry["transformers"] = bench_transformers(model, settings, workloads, decode_prompt)
            entry["transformers"]["loadavg_1m_after"] = os.getloadavg()[0]
            print(f"  {entry['transformers']}", flush=True)
            results["dtypes"][dtype] = entry
            del model
    finally:
        ray.shutdown()
    results["bench_wall_s"] = time.perf_counter() - started

    print()
    print(render_table(results, settings))
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(results, indent=2))
    return 0


def render_table(results: dict, settings: Settings) -> str:
    bw = results["read_bandwidth_gbs"]
    n = settings.num_requests
    lines = [
        f"Read bandwidth (sum over 512 MB fp32, best of 5): {bw:.1f} GB/s; {results['machine']['cores']} cores.",
        f"Batch-1 decode: prompt {settings.decode_prompt} tokens, {settings.decode_tokens} new tokens, decode only.",
    ]
    for m in settings.mixes:
        (p_lo, p_hi), (o_lo, o_hi) = m.prompt_len, m.output_len
        lines.append(f"Mix {m.name!r}: {n} requests, prompt {p_lo}..{p_hi} tokens, output {o_lo}..{o_hi} tokens (fixed seed).")
    lines += [
        f"transformers sequential is estimated from {settings.sequential_subset} requests of each mix (tok/s of that subset).",
        "shardserve on CPU: "
        + ("compiled kernels (decode attention, fused element-wise ops)." if results.get("cpu_kernels")
           else "plain torch (kernels off or not built)."),
        f"Machine load (1-min load average) at start {results['loadavg_1m_at_start']:.1f}; "
        f"{CORES} cores, shared with other work: numbers move with it.",
        "",
        "| dtype | system | layout (tp x pp) | decode b=1 tok/s | share of read BW | "
        + " | ".join(f"{m.name}: {n}-concurrent tok/s | vs HF sequential | vs HF static batch" for m in settings.mixes)
        + " |",
        "|---|---|---|---|---|" + "---|---|---|" * len(settings.mixes),
    ]
    for dtype, e in results["dtypes"].items():
        hf = e["transformers"]
        share = lambda r: f"{100 * e['weight_bytes_per_token'] * r / (bw * 1e9):.0f}%"  # noqa: E731
        base_decode = e["engine"].get("1x1", {}).get("decode_tok_s")
        for lay, r in e["engine"].items():
            tp, pp = lay.split("x")
            dec = f"{r['decode_tok_s']:.1f} ({r['decode_tok_s'] / hf['decode_tok_s']:.2f}x HF"
            if base_decode and lay != "1x1":
                dec += f", {r['decode_tok_s'] / base_decode:.2f}x 1x1"
            dec += ")"
            cells = []
            for m in settings.mixes:
                tok_s, h = r["throughput"][m.name]["tok_s"], hf["mixes"][m.name]
                cells.append(f"{tok_s:.1f} | {tok_s / h['sequential_tok_s']:.1f}x | {tok_s / h['static_tok_s']:.2f}x")
            lines.append(f"| {dtype} | shardserve | {tp} x {pp} | {dec} | {share(r['decode_tok_s'])} | " + " | ".join(cells) + " |")
        cells = [
            f"sequential (est.) {hf['mixes'][m.name]['sequential_tok_s']:.1f}; static batch {hf['mixes'][m.name]['static_tok_s']:.1f} | |"
            for m in settings.mixes
        ]
        lines.append(f"| {dtype} | transformers | - | {hf['decode_tok_s']:.1f} | {share(hf['decode_tok_s'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
