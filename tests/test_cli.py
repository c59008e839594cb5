"""`shardserve generate` end to end: a real process, its own local Ray cluster, JSON lines out."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from cluster.config import EngineConfig
from deployments.cli import _app_config, build_parser
from deployments.config import AppConfig, Listeners
from model.tokenizer import encode_prompt, load_tokenizer
from tests.reference import hf_greedy


def shardserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.ray  # the `shardserve generate` process starts its own Ray
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


@pytest.mark.ray  # the `shardserve generate` process starts its own Ray
def test_bad_layout_is_refused_with_the_numbers(tiny_llama_dir):
    proc = shardserve("generate", "--model", str(tiny_llama_dir), "-tp", "3", "--prompt", "hi", "--raw")
    assert proc.returncode == 2
    assert "3" in proc.stderr and "4" in proc.stderr  # tp=3 against 4 attention heads
    assert "Traceback" not in proc.stderr


@pytest.mark.ray  # the `shardserve generate` process starts its own Ray
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


# -- flags into the config: the parser and _app_config alone, no process, no Ray ----------------------
def parse(*argv: str):
    """(AppConfig, Listeners) for a command line."""
    return _app_config(build_parser().parse_args(list(argv)))


def subcommand(name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_every_engine_config_field_is_a_flag_of_its_own_name(command):
    """Each EngineConfig field has --field-name (underscores as dashes) writing to that field, in both commands."""
    flags = subcommand(command)._option_string_actions
    for name in EngineConfig.model_fields:
        flag = "--" + name.replace("_", "-")
        assert flag in flags, f"{command} has no {flag}"
        assert flags[flag].dest == name


def test_flags_end_up_in_the_app_config_and_the_rest_stays_default():
    """Engine and serving flags (bools as --no-..., tuples as N,N, short -pp) land in their AppConfig fields."""
    config, listeners = parse(
        "serve", "--max-num-seqs", "8", "--no-enable-prefix-caching", "--layer-split", "20,10", "-pp", "2",
        "--block-size", "8", "--num-replicas", "3", "--max-queued-requests", "5",
    )  # fmt: skip
    assert isinstance(config, AppConfig)
    assert config.max_num_seqs == 8
    assert config.enable_prefix_caching is False
    assert config.layer_split == (20, 10)
    assert config.pipeline_parallel_size == 2
    assert config.block_size == 8
    assert config.num_replicas == 3
    assert config.max_queued_requests == 5
    defaults = AppConfig()
    assert config.tensor_parallel_size == defaults.tensor_parallel_size == 1
    assert config.max_num_batched_tokens == defaults.max_num_batched_tokens
    assert config.engine_config().layer_split == (20, 10)  # what the engine itself gets
    assert listeners == Listeners()


def test_generate_takes_the_same_engine_flags():
    """`generate` parses engine flags into the same config (-tp short flag included)."""
    config, _ = parse("generate", "-tp", "2", "--max-model-len", "256", "--dtype", "bfloat16", "--prompt", "hi")
    assert (config.tensor_parallel_size, config.max_model_len, config.dtype) == (2, 256, "bfloat16")


SERVE_FILE = """\
http_options:
  host: 127.0.0.1
  port: 8123
grpc_options:
  port: 9123
  grpc_servicer_functions:
    - deployments.proto.shardserve_pb2_grpc.add_ShardServeServicer_to_server
applications:
  - name: shardserve
    route_prefix: /
    import_path: deployments.app:build_app
    args:
      max_num_seqs: 4
      tensor_parallel_size: 2
      num_replicas: null
      autoscaling: {min_replicas: 1, max_replicas: 3}
"""


def test_listener_flags_land_in_the_listeners():
    """--host and --port set the Listeners (the second element), not the AppConfig."""
    config, listeners = parse("serve", "--port", "9100", "--host", "0.0.0.0")
    assert listeners == Listeners(host="0.0.0.0", port=9100, grpc_port=9000)
    assert "host" not in config.model_dump() and "port" not in config.model_dump()


def test_config_file_listeners_apply_unless_a_flag_is_given(tmp_path):
    """Without flags the Serve file's http_options/grpc_options are the listeners; a flag replaces only its own."""
    path = tmp_path / "serve.yaml"
    path.write_text(SERVE_FILE)
    config, listeners = parse("serve", "--config", str(path))
    assert listeners == Listeners(host="127.0.0.1", port=8123, grpc_port=9123)
    assert (config.max_num_seqs, config.tensor_parallel_size) == (4, 2)
    assert config.autoscaling is not None and config.autoscaling.max_replicas == 3

    config, listeners = parse("serve", "--config", str(path), "--port", "9100", "--max-num-seqs", "8")
    assert listeners == Listeners(host="127.0.0.1", port=9100, grpc_port=9123)
    assert (config.max_num_seqs, config.tensor_parallel_size) == (8, 2)  # the flag wins, the file fills the rest


def test_num_replicas_flag_replaces_the_files_autoscaling(tmp_path):
    """A fixed --num-replicas drops the file's autoscaling block instead of clashing with it."""
    path = tmp_path / "serve.yaml"
    path.write_text(SERVE_FILE)
    config, _ = parse("serve", "--config", str(path), "--num-replicas", "2")
    assert config.num_replicas == 2 and config.autoscaling is None


@pytest.mark.ray  # `shardserve serve` starts its own Ray
def test_serve_stops_gracefully_on_sigterm_and_keeps_its_api_key_secret(tiny_llama_dir):
    """SIGTERM while streams are in flight: they finish whole, then the command exits 0 and no
    process of the Ray session it started is left. The API key, given as SHARDSERVE_API_KEY, is
    required of every request and appears in nothing it printed nor in any Ray log."""
    import asyncio
    import secrets
    import signal
    from pathlib import Path

    import httpx
    import psutil

    from tests.ports import free_port

    key = "sk-" + secrets.token_hex(16)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployments.cli", "serve", "--model", str(tiny_llama_dir), "--host", "127.0.0.1",
         "--port", str(port), "--grpc-port", str(free_port()), "--served-model-name", "tiny",
         "--cpus-per-worker", "0.5", "--drain-timeout-s", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # its own HAProxy's stats and metrics ports: the tests' Ray runs one too
        env={**os.environ, "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
             "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()), "SHARDSERVE_API_KEY": key},
    )  # fmt: skip
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "SIGTERM stops it" in line:
                break
        assert proc.poll() is None, "".join(lines)
        printed = "".join(lines)
        assert "ray get-auth-token" in printed  # how to open the dashboard behind Ray's token auth
        # Start-up feedback: each phase, each rank's load, the KV cache, quiet Serve internals.
        for phase in ("starting Ray", "starting Serve", "rank 0 (stage 1/1, tp 1/1, layers 0-", "GiB read in",
                      "KV cache: ", "shardserve: ready after"):  # fmt: skip
            assert phase in printed, (phase, printed)
        assert " INFO " not in printed, printed
        session = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        url = f"http://127.0.0.1:{port}/v1/completions"
        assert httpx.post(url, json={"model": "tiny", "prompt": "hi"}, timeout=60).status_code == 401
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip

        async def streams() -> list[list[str]]:
            async with httpx.AsyncClient(timeout=120) as client:
                flowing = asyncio.Event()

                async def one() -> list[str]:
                    auth = {"Authorization": f"Bearer {key}"}
                    async with client.stream("POST", url, json=body, headers=auth) as r:
                        assert r.status_code == 200
                        data = []
                        async for line in r.aiter_lines():
                            if line.startswith("data: "):
                                data.append(line[6:])
                                flowing.set()
                        return data

                tasks = [asyncio.ensure_future(one()) for _ in range(3)]
                await asyncio.wait_for(flowing.wait(), 60)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        for data in asyncio.run(streams()):
            assert data[-1] == "[DONE]"
            chunks = [json.loads(d) for d in data[:-1]]
            assert chunks[-2]["choices"][0]["finish_reason"] == "length"
            assert chunks[-1]["usage"]["completion_tokens"] == 1000
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, "".join(lines) + out
        assert key not in "".join(lines) + out
        for log in Path("/tmp/ray").glob("session_*/logs/**/*"):
            if log.is_file():
                assert key.encode() not in log.read_bytes(), log
        time.sleep(2)
        assert [pid for pid in session if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("flags,says", [
    (["-tp", "2"], "tensor parallel size 2 must divide num_heads 9"),  # SmolLM2 has 9 heads
    (["--port", "BUSY"], "cannot listen on 127.0.0.1:"),
    (["--cpus-per-worker", "4096"], "need 4096.2 CPUs and this machine has"),
    pytest.param(["--device", "cuda"], "on cuda need 1 GPUs and this machine has 0",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
])  # fmt: skip
def test_serve_refuses_what_cannot_work_in_one_line_before_ray_starts(flags, says):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        flags = [str(busy.getsockname()[1]) if f == "BUSY" else f for f in flags]
        r = shardserve("serve", *flags)
    assert r.returncode == 2
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Started a local Ray instance" not in r.stdout + r.stderr


def test_version_flag():
    r = shardserve("--version")
    assert r.returncode == 0 and r.stdout.startswith("shardserve ")


def test_monitor_says_in_one_line_what_it_lacks(tmp_path):
    from deployments import monitor

    r = shardserve("monitor", "--ray-temp-dir", str(tmp_path))  # no Ray session there
    says = "start shardserve first (`make serve`)" if monitor.find_prometheus() else "prometheus not found on PATH"
    assert r.returncode == 2
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
