"""Prometheus (and Grafana where installed) for a local Ray session: what the dashboard's Metrics
view needs to chart shardserve (`shardserve monitor`, `make monitor`).

Wired as Ray's docs describe: Prometheus scrapes the targets Ray's dashboard writes into the
session (``prom_metrics_service_discovery.json``: every node's metrics port), and the dashboard
finds Prometheus at ``RAY_PROMETHEUS_HOST`` (default ``http://localhost:9090``) and Grafana at
``RAY_GRAFANA_HOST`` (default ``http://localhost:3000``), the ports used here. Grafana runs with the
``grafana.ini`` Ray generates into the session, with k8s/grafana/shardserve.json added to Ray's own
dashboards. Prometheus comes from Debian's package (``python -m deployments.monitor install``, as
root) or from any ``prometheus`` binary on PATH; Grafana only from a ``grafana`` binary on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

RAY_TEMP_DIR = Path("/tmp/ray")
TARGETS_FILE = "prom_metrics_service_discovery.json"
GRAFANA_DASHBOARD = Path(__file__).resolve().parents[1] / "k8s" / "grafana" / "shardserve.json"
GRAFANA_HOME = "/usr/share/grafana"  # where Grafana's packages keep its public files


def ray_targets_file(temp_dir: Path = RAY_TEMP_DIR) -> Path:
    """The scrape targets of the newest Ray session under temp_dir (written by Ray's dashboard)."""
    return temp_dir / "session_latest" / TARGETS_FILE


def write_targets(path: Path, addresses: list[str]) -> None:
    """A target file as Ray's dashboard writes it, for a session without the dashboard (tests)."""
    path.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": addresses}]))


def prometheus_config(targets_file: Path, scrape_interval_s: float) -> str:
    """Prometheus's config (JSON is YAML): one job, ``ray``, over Ray's target file, re-read as it changes."""
    interval = f"{scrape_interval_s:g}s"
    return json.dumps({
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [{"job_name": "ray", "file_sd_configs": [{"files": [str(targets_file)]}]}],
    }, indent=2)  # fmt: skip


def find_prometheus() -> str | None:
    return shutil.which("prometheus")


def find_grafana() -> str | None:
    return shutil.which("grafana")


def start_prometheus(binary: str, workdir: Path, targets_file: Path, host: str, port: int,
                     scrape_interval_s: float) -> subprocess.Popen:  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(prometheus_config(targets_file, scrape_interval_s))
    log = open(workdir / "prometheus.log", "ab")
    return subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address={host}:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def start_grafana(binary: str, session_dir: Path, workdir: Path, host: str, port: int) -> subprocess.Popen:
    """Grafana with Ray's generated config and dashboards, shardserve's among them."""
    grafana = session_dir / "metrics" / "grafana"
    if not (grafana / "grafana.ini").exists():
        raise FileNotFoundError(
            f"{grafana / 'grafana.ini'} is missing: Ray writes it when it starts with its dashboard"
        )
    shutil.copy(GRAFANA_DASHBOARD, grafana / "dashboards" / "shardserve_grafana_dashboard.json")
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GF_SERVER_HTTP_ADDR": host, "GF_SERVER_HTTP_PORT": str(port),
           "GF_PATHS_DATA": str(workdir / "grafana-data")}  # fmt: skip
    log = open(workdir / "grafana.log", "ab")
    return subprocess.Popen([binary, "server", f"--config={grafana / 'grafana.ini'}", f"--homepath={GRAFANA_HOME}"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    """Until Prometheus answers /-/ready; raises if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with status {process.returncode} (see its log)")
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prometheus did not become ready at {url} in {timeout_s:g} s")


def query(url: str, expr: str) -> float:
    """The value of an instant query that yields one series, 0.0 if it yields none."""
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def install_prometheus() -> int:
    """Debian's prometheus package, where there is none on PATH and this runs as root with apt."""
    if find_prometheus():
        return 0
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("prometheus not installed: install Debian's `prometheus` package as root, or put Prometheus's "
              "release binary on PATH", file=sys.stderr)  # fmt: skip
        return 1
    install = ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, stdout=subprocess.DEVNULL, check=True)  # stale package lists
        subprocess.run(install, env=env, stdout=subprocess.DEVNULL, check=True)
    print(f"installed {find_prometheus()}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m deployments.monitor install")
    sys.exit(install_prometheus())
