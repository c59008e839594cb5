"""bench/device_check.py, the script for a lent GPU machine, runs here on CPU with a tiny model (bounded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_runs_without_ray_and_reports_every_part(tmp_path):
    # The lent machine has no Ray: here a `ray` package that refuses to import stands first on the path.
    (tmp_path / "no_ray" / "ray").mkdir(parents=True)
    (tmp_path / "no_ray" / "ray" / "__init__.py").write_text("raise ImportError('no Ray on this machine')\n")
    out = tmp_path / "device.json"
    cmd = [sys.executable, str(REPO / "bench/device_check.py"), "--device", "cpu", "--model-shape", "tiny",
           "--out-json", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "no_ray")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["parity"]["all_equal"], result["parity"]  # fp32 on CPU: token for token
    assert result["parity"]["max_logprob_diff"] < 2e-4
    speed = result["speed"]
    assert speed["decode_tok_s"] > 0 and 0 < speed["bandwidth_share"]
    assert speed["concurrent_32_tok_s"] > 0 and speed["concurrent_128_tok_s"] > 0
