"""`shardserve generate` end to end: a real process, its own local Ray cluster, JSON lines out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from model.tokenizer import encode_prompt, load_tokenizer
from tests.reference import hf_greedy

pytestmark = pytest.mark.ray  # each `shardserve generate` process starts its own Ray


def shardserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_prints_one_json_line_per_prompt_matching_transformers(tiny_llama_dir, tmp_path):
    prompts = ["The quick brown fox", "Paris is the capital of"]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
    proc = shardserve(
        "generate", "--model", str(tiny_llama_dir), "-tp", "2", "-pp", "1",
        "--prompts-file", str(path), "--raw", "--max-tokens", "6",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["prompt"] for line in lines] == prompts
    tok = load_tokenizer(tiny_llama_dir)
    refs = hf_greedy(tiny_llama_dir, [encode_prompt(tok, p, raw=True) for p in prompts], 6)
    for line, ref in zip(lines, refs):
        assert line["finish_reason"] in ("stop", "length")
        assert line["token_ids"] == ref.token_ids[: len(line["token_ids"])]
        assert line["text"] == tok.decode(line["token_ids"], skip_special_tokens=True)


def test_bad_layout_is_refused_with_the_numbers(tiny_llama_dir):
    proc = shardserve("generate", "--model", str(tiny_llama_dir), "-tp", "3", "--prompt", "hi", "--raw")
    assert proc.returncode == 2
    assert "3" in proc.stderr and "4" in proc.stderr  # tp=3 against 4 attention heads
    assert "Traceback" not in proc.stderr


def test_config_file_errors_name_the_field_and_flags_override_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications:\n  - import_path: deployments.app:build_app\n    args: {pipeline_parallel_size: -1}\n")
    proc = shardserve("generate", "--config", str(bad), "--prompt", "hi")
    assert proc.returncode == 2
    assert "applications[0].args: pipeline_parallel_size" in proc.stderr

    good = tmp_path / "good.yaml"
    good.write_text("pipeline_parallel_size: 2\n")
    proc = shardserve("generate", "--config", str(good), "-pp", "0", "--prompt", "hi")
    assert proc.returncode == 2
    assert "command line: pipeline_parallel_size" in proc.stderr  # the flag replaced the file's 2
