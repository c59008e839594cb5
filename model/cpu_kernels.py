"""Compiled CPU kernels (model/csrc), built on first use and cached per machine.

Decode attention over the paged KV cache (csrc/paged_attention.cpp), the fused element-wise
steps of a Llama layer (csrc/fused_ops.cpp) and the matmul of decode steps of one or two
tokens (csrc/gemv.cpp). The build needs g++ and ninja (a dependency of this
package) and takes ~20 s; the library is kept in torch's extension cache ($TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions) and later loads take well under a second. `make` builds it once
up front (`python -m model.cpu_kernels`). Where it cannot be built, or with
SHARDSERVE_CPU_KERNELS=0, the model runs in plain torch: same results up to float rounding, slower.

The library is named after the CPU's vector extension, so a cache built on an AVX-512 machine is
never loaded on one without it, and after a digest of what goes into the build (the sources'
contents, the flags, torch's version) but not of where the sources lie: a library compiled into
an image at one path is loaded as it is by workers that import shardserve from another. A build
killed half-way leaves a `lock` file in its build directory that makes the next build wait for
ever: delete that directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("paged_attention.cpp", "fused_ops.cpp", "gemv.cpp")]
HEADERS = [CSRC / name for name in ("float_convert.h", "kernels.h")]
OPS = ("paged_decode_attention", "rms_norm", "add_rms_norm", "silu_and_mul", "rotary", "gemv")
SWITCH = "SHARDSERVE_CPU_KERNELS"
# -fopenmp: at::parallel_for is an OpenMP loop compiled into the library; it links libgomp.so.1,
# which resolves to the copy torch has already loaded, so both share one thread pool.
# -fassociative-math (with the two flags it needs) lets dot products end in a tree of adds rather
# than 16 adds in a row. It changes no floating-point modes, unlike -ffast-math.
BASE_FLAGS = ["-O3", "-fopenmp", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
# CPU_CAPABILITY_* selects the matching at::vec implementation (and its vectorized exp).
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
}

_loaded: bool | None = None
_lock = threading.Lock()
# How load() got the library: "cache" (a library built before, loaded as it is) or "built".
how_loaded: str | None = None


def enabled() -> bool:
    return os.environ.get(SWITCH, "1") != "0"


def available() -> bool:
    """True once load() has succeeded in this process (the hot path asks this, never builds)."""
    return bool(_loaded)


_DTYPES = frozenset((torch.float32, torch.bfloat16))


def usable(t: torch.Tensor) -> bool:
    """Whether the kernels take tensor t: loaded, and t a CPU tensor of float32 or bfloat16 (asked
    a few hundred times a step, so it reads tensor attributes that build no objects)."""
    return available() and t.is_cpu and t.dtype in _DTYPES


def load() -> bool:
    """Builds (first time on this machine) and loads the kernels; False where that is not possible."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = enabled() and _build_and_load()
        return _loaded


def library_name(capability: str) -> str:
    """The cache key: the vector extension and a digest of the build's inputs, never their path."""
    digest = hashlib.sha256(torch.__version__.encode())
    for flag in BASE_FLAGS + ISA_FLAGS.get(capability, []):
        digest.update(b"\0" + flag.encode())
    for path in sorted(SOURCES + HEADERS):
        digest.update(b"\0" + path.name.encode() + b"\0" + path.read_bytes())
    isa = re.sub(r"\W", "_", capability.lower())
    return f"shardserve_cpu_{isa}_{digest.hexdigest()[:12]}"


def _build_and_load() -> bool:
    global how_loaded
    capability = torch.backends.cpu.get_cpu_capability()
    name = library_name(capability)
    try:
        from torch.utils.cpp_extension import _get_build_directory, load as build

        # A library of this name was built from these very inputs: load it without torch's build
        # step, whose ninja file names the source paths and would compile again at a new path.
        build_dir = Path(_get_build_directory(name, verbose=False))
        library = build_dir / f"{name}.so"
        if library.exists() and not (build_dir / "lock").exists():  # (a lock: a build under way)
            torch.ops.load_library(str(library))
            how_loaded = "cache"
        else:
            _put_ninja_on_path()
            build(name=name, sources=[str(s) for s in SOURCES], extra_cflags=BASE_FLAGS + ISA_FLAGS.get(capability, []),
                  extra_ldflags=["-fopenmp"], is_python_module=False)
            how_loaded = "built"
    except Exception as e:  # no compiler, no ninja, a failed build: fall back, but say why
        reason = str(e).strip().splitlines()
        log.warning("CPU kernels unavailable, the model runs in plain torch: %s", reason[0] if reason else type(e).__name__)
        return False
    return all(hasattr(torch.ops.shardserve, op) for op in OPS)


def _put_ninja_on_path() -> None:
    # torch runs `ninja` from PATH; a venv's bin directory is not on it unless the venv is activated.
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])


def main() -> int:
    start = time.perf_counter()
    if not enabled():
        print(f"CPU kernels disabled by {SWITCH}=0")
        return 0
    if load():
        print(f"CPU kernels ready ({how_loaded}, {time.perf_counter() - start:.1f} s)")
        return 0
    print("CPU kernels could not be built; the model will run in plain torch", file=sys.stderr)
    return 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
