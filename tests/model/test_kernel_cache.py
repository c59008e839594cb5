"""The compiled CPU kernels' cache is keyed by what is built, not where the sources lie: an image
compiles them at one path and its workers import shardserve from another (site-packages)."""

import shutil
import subprocess
import sys
from pathlib import Path

import model

# Imports model.cpu_kernels from the first sys.path entry and says where from and how it loaded.
PROBE = """
import sys, torch
from model import cpu_kernels
assert cpu_kernels.load()
print(cpu_kernels.__file__, cpu_kernels.how_loaded, cpu_kernels.library_name(torch.backends.cpu.get_cpu_capability()))
"""


def _probe(package_root: Path) -> tuple[str, str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=package_root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return tuple(out.stdout.split())


def _copy_package(root: Path) -> Path:
    shutil.copytree(Path(model.__file__).parent, root / "model", ignore=shutil.ignore_patterns("__pycache__"))
    return root / "model"


def test_a_copy_of_the_package_elsewhere_loads_the_library_already_built(compiled_cpu_ops, tmp_path):
    _copy_package(tmp_path)
    path, how, _ = _probe(tmp_path)
    assert Path(path).is_relative_to(tmp_path)  # the copy's sources, at a path never built from
    assert how == "cache"


def test_changed_sources_get_a_library_of_their_own(tmp_path):
    original = _copy_package(tmp_path / "a")
    changed = _copy_package(tmp_path / "b")
    with open(changed / "csrc" / "gemv.cpp", "a") as f:
        f.write("\n// changed\n")
    probe = "import torch; from model import cpu_kernels; print(cpu_kernels.library_name('AVX2'))"
    names = [subprocess.run([sys.executable, "-c", probe], cwd=root.parent, capture_output=True, text=True,
                            check=True).stdout.strip() for root in (original, changed)]  # fmt: skip
    assert names[0].startswith("shardserve_cpu_avx2_") and names[0] != names[1]
