"""Whether Serve's replicas fit the worker pods: what one replica needs on each pod, and packing.

A replica's placement group is ``replica_bundles(config)`` (deployments/placement.py) packed as
its layout's strategy says: STRICT_PACK (pp == 1) puts the whole gang on one pod; PACK (pp > 1)
may spread it, and we ask that each pipeline stage's bundles fit one pod so a TP group never
spans hosts.
"""

from __future__ import annotations

import math

import yaml

from deployments.config import AppConfig, parse_app_config
from deployments.placement import ROUTER_CPUS, replica_bundles

Resources = dict[str, float]


class ResourceFitError(ValueError):
    """The Serve replicas of a manifest cannot be placed on its worker pods."""


def _fmt(res: Resources) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def _add(*parts: Resources) -> Resources:
    out: Resources = {}
    for part in parts:
        for k, v in part.items():
            out[k] = round(out.get(k, 0.0) + v, 6)
    return out


def _fits(need: Resources, free: Resources) -> bool:
    return all(v <= free.get(k, 0.0) + 1e-9 for k, v in need.items())


def serve_replica_range(config: AppConfig) -> tuple[int, int]:
    """Fewest and most LLMServer replicas Serve may run."""
    if config.autoscaling is not None:
        return config.autoscaling.min_replicas, config.autoscaling.max_replicas
    return config.num_replicas, config.num_replicas


def replica_units(config: AppConfig) -> tuple[list[Resources], str, str]:
    """The parts of one replica that must each land on one pod, the PG strategy, and a description."""
    bundles = replica_bundles(config)
    parallel = config.parallel
    strategy = parallel.placement_strategy
    layout = f"tp={parallel.tp} x pp={parallel.pp}"
    if strategy == "STRICT_PACK":
        return [_add(*bundles)], strategy, f"{layout}, STRICT_PACK: the whole gang on one pod"
    workers = bundles[1:]
    stages = [_add(*(workers[r] for r in parallel.stage_ranks(s))) for s in range(parallel.pp)]
    stages[0] = _add(bundles[0], stages[0])  # the replica's own bundle travels with stage 0
    return stages, strategy, f"{layout}, {strategy}: each stage's tp bundles on one pod"


def _units_for(config: AppConfig, replicas: int) -> list[Resources]:
    units, _, _ = replica_units(config)
    return [{"CPU": ROUTER_CPUS}] + units * replicas


def _pack(units: list[Resources], pods: list[Resources]) -> int | None:
    """Place units first-fit, largest first; the pods used, or None when some unit finds no room."""
    free = [dict(p) for p in pods]
    used = set()
    for unit in sorted(units, key=lambda u: (u.get("GPU", 0.0), u.get("CPU", 0.0)), reverse=True):
        for i, room in enumerate(free):
            if _fits(unit, room):
                for k, v in unit.items():
                    room[k] = room.get(k, 0.0) - v
                used.add(i)
                break
        else:
            return None
    return len(used)


def pods_needed(config: AppConfig, replicas: int, pod: Resources) -> int:
    """Worker pods of one shape that hold `replicas` LLMServer replicas and the Router."""
    units = _units_for(config, replicas)
    for unit in units:
        if not _fits(unit, pod):
            _, _, how = replica_units(config)
            raise ResourceFitError(
                f"a replica needs {_fmt(unit)} on one pod ({how}), more than a worker pod has: {_fmt(pod)}; "
                f"render bigger pods with --worker-cpus / --worker-gpus"
            )
    return _pack(units, [pod] * len(units))


def _cpu_quantity(value) -> float:
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _pod_capacity(group: dict, where: str, problems: list[str]) -> Resources:
    """Ray's view of one pod: rayStartParams when given (they must agree with the pod), else its limits."""
    params = group.get("rayStartParams") or {}
    container = group["template"]["spec"]["containers"][0]
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    cap: Resources = {}
    pairs = (("CPU", "num-cpus", "cpu", _cpu_quantity), ("GPU", "num-gpus", "nvidia.com/gpu", float))
    for ray_key, param, k8s_key, parse in pairs:
        limit = limits.get(k8s_key, requests.get(k8s_key))
        if param in params:
            cap[ray_key] = float(params[param])
            if limit is not None and parse(limit) != cap[ray_key]:
                problems.append(
                    f"{where}: rayStartParams {param}={params[param]} but the container's {k8s_key} is {limit}"
                )
        elif limit is not None:
            cap[ray_key] = float(math.ceil(parse(limit)))  # as KubeRay fills in num-cpus: whole units, rounded up
    gpu_req, gpu_lim = requests.get("nvidia.com/gpu"), limits.get("nvidia.com/gpu")
    if gpu_req is not None and gpu_lim is not None and str(gpu_req) != str(gpu_lim):
        problems.append(f"{where}: nvidia.com/gpu request {gpu_req} differs from its limit {gpu_lim}")
    return cap


def check_resource_fit(manifest: dict) -> dict:
    """Raise ResourceFitError unless Serve's largest replica count fits the worker groups' largest size.

    Returns {"units": [...], "strategy": ..., "max_pods_used": n} for a fitting manifest.
    """
    problems: list[str] = []
    cluster = manifest["spec"]["rayClusterConfig"]
    serve_cfg = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    config = parse_app_config(serve_cfg["applications"][0].get("args") or {}, "serveConfigV2: applications[0].args")

    head = cluster["headGroupSpec"]
    if str((head.get("rayStartParams") or {}).get("num-cpus")) != "0":
        problems.append(f"headGroupSpec: rayStartParams num-cpus must be \"0\" so no model runs on the head, "
                        f"got {(head.get('rayStartParams') or {}).get('num-cpus')!r}")  # fmt: skip

    pods: list[Resources] = []
    shapes = []
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        where = f"workerGroupSpecs[{i}] ({group.get('groupName')})"
        cap = _pod_capacity(group, where, problems)
        max_pods = group.get("maxReplicas", 2**31 - 1)
        shapes.append(f"{group.get('groupName')!r}: up to maxReplicas={max_pods} pods of {_fmt(cap)}")
        if config.device == "cuda" and not cap.get("GPU"):
            problems.append(f"{where}: device is cuda but the pods have no GPUs (nvidia.com/gpu / num-gpus)")
        pods += [cap] * min(max_pods, 1024)

    units, strategy, how = replica_units(config)
    lo, hi = serve_replica_range(config)
    groups = "; ".join(shapes) or "no worker groups"
    for unit in units:
        if not any(_fits(unit, p) for p in pods):
            problems.append(f"a replica needs {_fmt(unit)} on one pod ({how}), more than any worker pod has ({groups})")
    if not problems:
        used = _pack(_units_for(config, hi), pods)
        if used is None:
            fit = max((n for n in range(hi) if _pack(_units_for(config, n), pods) is not None), default=0)
            problems.append(
                f"Serve may run max_replicas={hi} LLMServer replicas of {len(units)} x {_fmt(units[0])} "
                f"({how}) plus the Router {{CPU: {ROUTER_CPUS:g}}}, but the worker groups ({groups}) "
                f"hold only {fit}: raise maxReplicas or shrink the replica range"
            )
    if problems:
        raise ResourceFitError("resources do not fit:\n  " + "\n  ".join(problems))
    return {"units": units, "strategy": strategy, "max_pods_used": used, "serve_replicas": (lo, hi)}
