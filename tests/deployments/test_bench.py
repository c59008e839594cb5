"""`shardserve bench` against the served tiny app over real HTTP: bounded, loopback, figures present (not their speed)."""

from __future__ import annotations

import json

import pytest

from deployments.bench import datasets
from deployments.cli import main as cli_main
from tests.deployments.served_app import API_KEY

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def bench(served, tmp_path, *extra: str, name: str = "run") -> tuple[int, dict]:
    out = tmp_path / f"{name}.json"
    code = cli_main(["bench", "run", "--url", served.http, "--model", "tiny", "--label", name, "--out", str(out),
                     "--max-seconds", "120", *extra])  # fmt: skip
    return code, json.loads(out.read_text())


def test_sweep_over_concurrency_and_a_poisson_rate_reports_every_figure(served, tmp_path):
    code, result = bench(served, tmp_path, "--api-key", API_KEY, "--num-requests", "6", "--concurrency", "1,3",
                         "--request-rate", "4", "--warmup", "1", "--plots", str(tmp_path / "plots"))  # fmt: skip
    assert code == 0
    assert [run["load"] for run in result["runs"]] == [
        {"concurrency": 1, "rate": None}, {"concurrency": 3, "rate": None}, {"concurrency": 3, "rate": 4.0}
    ]
    asked = sum(r.max_tokens for r in datasets.chat(6))  # greedy with ignore_eos: exactly max_tokens each
    for run in result["runs"]:
        assert (run["requests"], run["completed"], run["errors"]) == (6, 6, {})
        assert run["output_tokens"] == asked and run["prompt_tokens"] > 0
        assert run["output_throughput"] == pytest.approx(asked / run["duration_s"])
        for metric in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
            stats = run[metric]
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (metric, stats)
        assert run["ttft_ms"]["p50"] < run["e2e_ms"]["p50"]
    for name in ("throughput_vs_concurrency.png", "ttft_vs_throughput.png", "itl_vs_throughput.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG_MAGIC


def test_refusals_are_counted_by_status_and_fail_the_command(served, tmp_path):
    code, result = bench(served, tmp_path, "--api-key", "wrong", "--num-requests", "3", "--concurrency", "2",
                         "--warmup", "0", name="refused")  # fmt: skip
    assert code == 1
    (run,) = result["runs"]
    assert (run["completed"], run["errors"]) == (0, {"401": 3})
    assert run["output_throughput"] == 0 and run["ttft_ms"]["p50"] is None
    assert "missing or wrong API key" in run["error_samples"][0]


def test_plot_draws_several_result_files_together(served, tmp_path):
    for name in ("a", "b"):
        bench(served, tmp_path, "--api-key", API_KEY, "--num-requests", "2", "--concurrency", "1,2", "--warmup", "0",
              name=name)  # fmt: skip
    assert cli_main(["bench", "plot", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out-dir",
                     str(tmp_path / "both")]) == 0  # fmt: skip
    assert (tmp_path / "both" / "throughput_vs_concurrency.png").read_bytes()[:8] == PNG_MAGIC


def test_datasets_are_seeded_and_sized(tiny_llama_dir):
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    fixed = datasets.load("fixed", 3, tokenizer=tok, input_len=40, output_len=7)
    assert all(r.max_tokens == 7 for r in fixed)
    assert all(len(tok.encode(r.messages[0]["content"], add_special_tokens=False)) == pytest.approx(40, abs=2)
               for r in fixed)  # fmt: skip
    assert datasets.load("random", 4, tokenizer=tok, seed=1) == datasets.load("random", 4, tokenizer=tok, seed=1)
    shared = datasets.load("shared-prefix", 3, tokenizer=tok, prefix_len=64)
    assert len({r.messages[0]["content"] for r in shared}) == 1 and len({r.messages[1]["content"] for r in shared}) == 3
    assert len(datasets.chat(100)) == 100
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        datasets.load("fixed", 1)


def test_weight_bytes_count_every_stored_tensor_once(tiny_llama_dir):
    """The bytes a batch-1 decode step reads, as the peer comparison's bandwidth share uses them."""
    from safetensors.torch import load_file

    from deployments.bench.bandwidth import weight_bytes

    numel = sum(t.numel() for f in tiny_llama_dir.glob("*.safetensors") for t in load_file(f).values())
    assert weight_bytes(tiny_llama_dir, 4) == 4 * numel
    assert weight_bytes(tiny_llama_dir, 2) == 2 * numel


def test_peer_summary_gives_decode_speed_and_its_share_of_read_bandwidth():
    from deployments.bench.peers import Workload, summary_table

    run = {"output_throughput": 100.0, "ttft_ms": {"p50": 250.0}}
    result = {"label": "x float32", "decode": {"tpot_ms": {"p50": 40.0}}, "runs": [run],
              "weight_bytes": 500_000_000, "read_bandwidth_gbs": 25.0}  # fmt: skip
    table = summary_table([result], Workload(concurrency=(8,)))
    # 25 tok/s x 0.5 GB = 12.5 GB/s of 25 GB/s
    assert "| x float32 | 25.0 (50%) | 100.0 (0.25) |" in table
