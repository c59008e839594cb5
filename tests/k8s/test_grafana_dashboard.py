"""The Grafana dashboard charts exactly the metrics deployments/metrics.py defines (no Ray needed)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((REPO / "k8s/grafana/shardserve.json").read_text())


def defined_metrics() -> set[str]:
    """Names passed as the first argument to the metric constructors and helpers in metrics.py."""
    tree = ast.parse((REPO / "deployments/metrics.py").read_text())
    return {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
        and node.args[0].value.startswith("shardserve_")
    }


def charted_metrics() -> set[str]:
    names = set()
    for panel in DASHBOARD["panels"]:
        for target in panel.get("targets", []):
            for name in re.findall(r"ray_(shardserve_[a-z_]+)", target["expr"]):
                names.add(re.sub(r"_(bucket|sum|count|total)$", "", name))
    return names


def test_every_charted_metric_exists_and_every_metric_is_charted():
    defined = defined_metrics()
    assert len(defined) >= 14
    assert charted_metrics() == defined


def test_panels_have_titles_and_use_the_datasource_variable():
    panels = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
    assert panels
    for p in panels:
        assert p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
