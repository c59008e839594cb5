"""A manifest as the cluster will see it: the CRD schema, the operator's own rules, Ray Serve's
schema, the AppConfig, and the resource fit."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from deployments.config import AppConfig, ConfigError, check_serve_schema, parse_app_config
from deployments.k8s.crd_schema import ManifestError, schema_errors
from deployments.k8s.fit import ResourceFitError, check_resource_fit

UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
MAX_RAYSERVICE_NAME = 47  # the operator's limit, so the names it derives stay within 63 characters
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def operator_rule_errors(manifest: dict) -> list[str]:
    """Rules the KubeRay operator enforces at reconcile time (not in the CRD schema)."""
    problems = []
    name = (manifest.get("metadata") or {}).get("name", "")
    if not _DNS1035.match(name or "") or len(name) > MAX_RAYSERVICE_NAME:
        problems.append(f"metadata.name: {name!r} must be a DNS-1035 label of at most {MAX_RAYSERVICE_NAME} characters")
    spec = manifest.get("spec") or {}
    kind = (spec.get("upgradeStrategy") or {}).get("type")
    if kind is not None and kind not in UPGRADE_TYPES:
        problems.append(f"spec.upgradeStrategy.type: {kind!r} is not one of {', '.join(UPGRADE_TYPES)}")
    cluster = spec.get("rayClusterConfig") or {}
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        lo, hi, n = group.get("minReplicas", 0), group.get("maxReplicas", 2**31 - 1), group.get("replicas", 0)
        if lo > hi:
            problems.append(f"workerGroupSpecs[{i}]: minReplicas {lo} is more than maxReplicas {hi}")
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            problems.append(f"workerGroupSpecs[{i}]: set resources in rayStartParams or in resources, not both")
        if not cluster.get("enableInTreeAutoscaling") and not lo <= n <= hi:
            problems.append(f"workerGroupSpecs[{i}]: replicas {n} is outside minReplicas..maxReplicas ({lo}..{hi})")
    return problems


def check_manifest(manifest: dict, source: str = "manifest") -> AppConfig:
    """Every check a RayService of ours must pass; raises ManifestError listing all problems."""
    problems = schema_errors(manifest)
    if problems:  # later checks read fields the schema guarantees
        raise ManifestError(source, problems)
    problems = operator_rule_errors(manifest)
    config = None
    try:
        serve_cfg = yaml.safe_load(manifest["spec"].get("serveConfigV2") or "")
        if not isinstance(serve_cfg, dict):
            raise ConfigError("serveConfigV2: expected a YAML mapping")
        check_serve_schema(serve_cfg, "serveConfigV2")
        args = (serve_cfg["applications"][0] or {}).get("args") or {}
        config = parse_app_config(args, "serveConfigV2: applications[0].args")
        check_resource_fit(manifest)
    except (ConfigError, ResourceFitError, yaml.YAMLError) as e:
        problems.append(str(e))
    if problems:
        raise ManifestError(source, problems)
    return config


def check_file(path: str | Path) -> AppConfig:
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    if len(docs) != 1:
        raise ManifestError(str(path), [f"expected one YAML document, found {len(docs)}"])
    return check_manifest(docs[0], str(path))
