"""The Grafana dashboard charts exactly the metrics deployments/metrics.py defines (no Ray needed).

metrics.py is read with ``ast``, not imported: each string literal ``"shardserve_..."`` or ``"vllm_..."`` passed as
the first argument to ``metrics.Counter/Gauge/Histogram`` or to the local ``counter/gauge/histogram``
helpers is a metric, its type is the callee's name and its labels are the ``tag_keys`` of its class.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = json.loads((REPO / "k8s/grafana/shardserve.json").read_text())
DATASOURCE = "${datasource}"
# What Ray's Prometheus exporter appends to each type's name.
SUFFIXES = {"counter": {"_total"}, "gauge": {""}, "histogram": {"_bucket", "_sum", "_count"}}
METRIC = r"(?:shardserve|vllm)_[a-z0-9_]+"
SERIES = re.compile(rf"ray_({METRIC})(\{{[^}}]*\}})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def defined_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """{name: (type, labels)} for every metric created in deployments/metrics.py: a call's labels are its
    own ``tag_keys``, else (the local helpers) its class's ``TAGS``."""
    tree = ast.parse((REPO / "deployments/metrics.py").read_text())
    out = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        consts = {t.id: stmt.value for stmt in cls.body if isinstance(stmt, ast.Assign)
                  for t in stmt.targets if isinstance(t, ast.Name)}  # fmt: skip
        for call in (n for n in ast.walk(cls) if isinstance(n, ast.Call)):
            if not (call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
                continue
            name = call.args[0].value
            if not re.fullmatch(METRIC, name):
                continue
            callee = call.func.attr if isinstance(call.func, ast.Attribute) else call.func.id
            assert callee.lower() in SUFFIXES, f"{name}: made by {callee}(), not a counter, gauge or histogram"
            (tags,) = [kw.value for kw in call.keywords if kw.arg == "tag_keys"] or [consts["TAGS"]]
            out[name] = (callee.lower(), frozenset(ast.literal_eval(tags)))
    return out


DEFINED = defined_metrics()


def all_panels(panels: list[dict]) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    return [q for p in panels for q in [p, *all_panels(p.get("panels", []))]]


PANELS = all_panels(DASHBOARD["panels"])
CHARTS = [p for p in PANELS if p["type"] != "row"]
EXPRS = [(p["title"], t["expr"]) for p in CHARTS for t in p.get("targets", [])]


def base_name(exported: str) -> str:
    return re.sub(r"_(bucket|sum|count|total)$", "", exported)


def test_metrics_py_is_parsed():
    # Every metric name in the file was found as a metric, so none is made in a way this test misses.
    source = (REPO / "deployments/metrics.py").read_text()
    assert set(re.findall(rf'"({METRIC})"', source)) == set(DEFINED)
    assert DEFINED["shardserve_requests"] == ("counter", {"model_name", "route", "status"})
    assert DEFINED["vllm_time_to_first_token_seconds"] == ("histogram", {"model_name", "replica"})
    assert DEFINED["vllm_num_requests_running"] == ("gauge", {"model_name", "replica"})
    assert DEFINED["vllm_request_success"] == ("counter", {"model_name", "replica", "finished_reason"})


def test_vllms_metric_names_as_ray_exports_them():
    # vLLM's set (vllm:NAME), with ':' → '_' as Ray Serve LLM exports vLLM's own metrics through Ray.
    vllm = {"num_requests_running": "gauge", "num_requests_waiting": "gauge", "kv_cache_usage_perc": "gauge",
            "time_to_first_token_seconds": "histogram", "inter_token_latency_seconds": "histogram",
            "e2e_request_latency_seconds": "histogram", "prompt_tokens": "counter", "generation_tokens": "counter",
            "prefix_cache_queries": "counter", "prefix_cache_hits": "counter", "num_preemptions": "counter"}  # fmt: skip
    assert {name: DEFINED["vllm_" + name][0] for name in vllm} == vllm


def test_every_charted_metric_exists_and_every_metric_is_charted():
    charted = {base_name(m) for _, expr in EXPRS for m, _ in SERIES.findall(expr)}
    assert charted - set(DEFINED) == set(), "charted but not defined in deployments/metrics.py"
    assert set(DEFINED) - charted == set(), "defined in deployments/metrics.py but charted by no panel"


def test_series_use_the_exported_name_and_the_model_and_replica_filters():
    for title, expr in EXPRS:
        found = SERIES.findall(expr)
        assert found, f"{title}: {expr} reads no shardserve metric"
        for exported, selector in found:
            kind, labels = DEFINED[base_name(exported)]
            suffix = exported[len(base_name(exported)) :]
            assert suffix in SUFFIXES[kind], f"{title}: a {kind} is exported with {SUFFIXES[kind]}, not {exported!r}"
            matchers = {label: (op, value) for label, op, value in MATCHER.findall(selector)}
            assert matchers.get("model_name") == ("=~", "$model"), f"{title}: {exported} lacks model_name=~\"$model\""
            if "replica" in labels:
                assert matchers.get("replica") == ("=~", "$replica"), f"{title}: {exported} lacks replica=~\"$replica\""
            allowed = labels | ({"le"} if kind == "histogram" else set())
            assert set(matchers) <= allowed, f"{title}: {exported} has no label {set(matchers) - allowed}"
        # Grouping labels must exist on the series the expression reads.
        allowed = set().union(*(DEFINED[base_name(m)][1] for m, _ in found)) | {"le"}
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            by = {g.strip() for g in group.split(",") if g.strip()}
            assert by <= allowed, f"{title}: groups by {by - allowed}, which {expr} does not carry"


def test_histograms_are_charted_as_quantiles_over_le():
    for title, expr in EXPRS:
        if "_bucket" in expr:
            assert re.search(r"histogram_quantile\(0\.\d+,\s*sum by \([^)]*\ble\b[^)]*\) \(rate\(", expr), (title, expr)


def test_panels_have_titles_and_use_the_datasource_variable():
    assert CHARTS
    for p in PANELS:
        assert p.get("title"), p
    for p in CHARTS:
        assert p["datasource"]["uid"] == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        assert all(t["datasource"]["uid"] == DATASOURCE for t in p["targets"]), p["title"]


def test_dashboard_identity_rows_and_variables():
    assert (DASHBOARD["uid"], DASHBOARD["title"]) == ("shardserve", "shardserve")
    assert [p["title"] for p in PANELS if p["type"] == "row"] == ["Traffic", "Latency", "Engine", "Prefix cache"]
    assert len({p["id"] for p in PANELS}) == len(PANELS)
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "replica"):
        v = variables[name]
        assert v["datasource"]["uid"] == DATASOURCE
        label = {"model": "model_name"}.get(name, name)
        assert re.fullmatch(rf"label_values\(ray_vllm_num_requests_running(\{{.*\}})?, {label}\)", v["query"]["query"])
