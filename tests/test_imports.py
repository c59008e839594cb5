"""Import weight of the serving layer: the router process must not load torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROUTER_MODULES = "deployments.router, deployments.request_router, deployments.placement, deployments.config"


def test_router_modules_do_not_import_torch():
    """Importing what the router process imports leaves torch out of sys.modules (a fresh interpreter)."""
    code = (
        f"import {ROUTER_MODULES}; import sys; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
