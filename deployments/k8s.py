"""KubeRay RayService manifests rendered from the app config, and the checks that say they will run.

``render`` turns a Serve config file (the AppConfig under ``applications[0].args``, the same
format as deployments/configs/local.yaml) into one RayService: ``serveConfigV2`` is that config
made cluster-ready, the head pod runs no model (``num-cpus: "0"``), and one worker group is sized
so that the Serve replica range fits. ``check`` validates a manifest the way the cluster will:
the CRD schema (deployments/crd_schema.py), the operator's own rules, Ray Serve's schema, the
AppConfig, and whether every replica's placement group fits the worker pods.

A replica's placement group is ``replica_bundles(config)`` packed as ``placement_strategy(...)``
says: STRICT_PACK (pp == 1) puts the whole gang on one pod; PACK (pp > 1) may spread it, and we
ask that each pipeline stage's bundles fit one pod so a TP group never spans hosts.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import yaml

from deployments.config import AppConfig, ConfigError, Listeners, check_serve_schema, parse_app_config, serve_listeners
from deployments.placement import ROUTER_CPUS, replica_bundles

APP_IMPORT_PATH = "deployments.app:build_app"
IMAGE_VERSION = "0.1.0"  # the shardserve version baked into the placeholder image tags
RAY_VERSION = version("ray")  # the cluster runs the Ray this package pins
UPGRADE_TYPES = ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
MAX_RAYSERVICE_NAME = 47  # the operator's limit, so the names it derives stay within 63 characters
# Port names KubeRay looks for on the head container; it builds the head Service from them.
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}
METRICS_PORT = HEAD_PORTS["metrics"]
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
# The pod's interface: gloo otherwise binds the hostname's address, which can be loopback in a pod.
WORKER_ENV = [{"name": "GLOO_SOCKET_IFNAME", "value": "eth0"}]
AUTOSCALER_RESOURCES = {"cpu": "500m", "memory": "512Mi"}

Resources = dict[str, float]


class ResourceFitError(ValueError):
    """The Serve replicas of a manifest cannot be placed on its worker pods."""


# -- the Serve config, made cluster-ready --------------------------------------------------------


def cluster_serve_config(serve_config: dict, source: str = "config") -> tuple[dict, AppConfig, Listeners]:
    """The Serve config as it must run on KubeRay, its AppConfig, and where its proxies listen.

    Proxies run on every node (KubeRay's worker readiness probe asks the local proxy for
    /-/healthz) and listen on 0.0.0.0 so the Kubernetes Services reach them. Everything else
    is carried over; ``args`` keeps the fields the file sets, normalized by AppConfig.
    """
    if "applications" not in serve_config:  # a bare AppConfig mapping, as load_serve_file accepts
        app = {"name": "shardserve", "route_prefix": "/", "import_path": APP_IMPORT_PATH, "args": serve_config}
        serve_config = {"applications": [app]}
    apps = serve_config["applications"]
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
        raise ConfigError(f"{source}: applications must hold exactly one application (shardserve)")
    app = apps[0]
    if app.get("import_path") != APP_IMPORT_PATH:
        got = app.get("import_path")
        raise ConfigError(f"{source}: applications[0].import_path must be {APP_IMPORT_PATH!r}, got {got!r}")
    given = app.get("args") or {}
    config = parse_app_config(given, f"{source}: applications[0].args")
    # Only what the file sets (nested blocks too), so new AppConfig fields do not change manifests.
    args = config.model_dump(mode="json", include=set(given), exclude_unset=True)

    out: dict = {
        "proxy_location": "EveryNode",
        "http_options": {**(serve_config.get("http_options") or {}), "host": "0.0.0.0"},
    }
    for key, value in serve_config.items():
        if key not in ("proxy_location", "http_options", "applications"):
            out[key] = value
    out["applications"] = [{**app, "args": args}]
    return out, config, serve_listeners(out, source)


# -- what one replica needs, and how many pods that takes ---------------------------------------


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


# -- rendering ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodShape:
    cpus: int
    memory: str
    gpus: int = 0

    def resources(self) -> dict:
        res = {"cpu": str(self.cpus), "memory": self.memory}
        if self.gpus:
            res["nvidia.com/gpu"] = str(self.gpus)
        return {"limits": res, "requests": dict(res)}  # requests == limits: Guaranteed pods, as KubeRay advises

    def ray_resources(self) -> Resources:
        return {"CPU": float(self.cpus), "GPU": float(self.gpus)} if self.gpus else {"CPU": float(self.cpus)}


@dataclass(frozen=True)
class RenderOptions:
    """Everything `shardserve k8s render` takes; None means the default for the config's device."""

    config: str
    gpu: bool = False
    out: str | None = None
    name: str | None = None
    image: str | None = None
    head_cpus: int | None = None
    head_memory: str | None = None
    worker_cpus: int | None = None
    worker_memory: str | None = None
    worker_gpus: int | None = None
    models_pvc: str = "shardserve-models"
    models_mount: str = "/models"

    def command(self) -> str:
        """The command line that renders exactly this manifest (it goes into the header)."""
        parts = ["shardserve", "k8s", "render", "--config", self.config]
        if self.gpu:
            parts.append("--gpu")
        defaults = RenderOptions(config=self.config)
        for field in ("name", "image", "head_cpus", "head_memory", "worker_cpus", "worker_memory", "worker_gpus",
                      "models_pvc", "models_mount"):  # fmt: skip
            value = getattr(self, field)
            if value != getattr(defaults, field):
                parts += ["--" + field.replace("_", "-"), str(value)]
        if self.out:
            parts += ["--out", self.out]
        return shlex.join(parts)


def _shapes(opts: RenderOptions, config: AppConfig) -> tuple[PodShape, PodShape]:
    if config.device == "cuda":
        gpus = opts.worker_gpus or config.tensor_parallel_size  # a worker pod holds one pipeline stage
        head = PodShape(opts.head_cpus or 2, opts.head_memory or "8Gi")
        worker = PodShape(opts.worker_cpus or 4 * gpus, opts.worker_memory or f"{16 * gpus}Gi", gpus)
    else:
        # The head holds the GCS, the dashboard, the Serve controller and its app-building task.
        head = PodShape(opts.head_cpus or 1, opts.head_memory or "3Gi")
        # Big enough for the largest part of a replica beside the Router, 2 CPUs at least; 2 GiB per CPU.
        need = max(u.get("CPU", 0.0) for u in replica_units(config)[0]) + ROUTER_CPUS
        cpus = opts.worker_cpus or max(2, math.ceil(need))
        worker = PodShape(cpus, opts.worker_memory or f"{2 * cpus}Gi")
    return head, worker


class _Literal(str):
    """A string dumped as a YAML block (`|`), so serveConfigV2 reads as YAML inside the manifest."""


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)  # indent list items under their key, kubectl style


_Dumper.add_representer(_Literal, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|"))


def _dump(doc) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


def build_rayservice(serve_config: dict, opts: RenderOptions) -> tuple[dict, AppConfig]:
    """The RayService document (a dict in manifest order) and the AppConfig it serves."""
    serve_cfg, config, listen = cluster_serve_config(serve_config, opts.config)
    gpu = config.device == "cuda"
    if opts.gpu and not gpu:
        raise ConfigError(f"{opts.config}: --gpu needs device: cuda in applications[0].args, got {config.device}")
    head, worker = _shapes(opts, config)
    lo, hi = serve_replica_range(config)
    min_pods = pods_needed(config, lo, worker.ray_resources())
    max_pods = pods_needed(config, hi, worker.ray_resources())
    image = opts.image or f"shardserve:{IMAGE_VERSION}-{'gpu' if gpu else 'cpu'}"
    name = opts.name or f"shardserve-{Path(opts.config).stem}"

    head_ports = dict(HEAD_PORTS, serve=listen.port)
    if listen.grpc_port is not None:
        head_ports["grpc"] = listen.grpc_port
    head_container = {
        "name": "ray-head",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": n, "containerPort": p} for n, p in head_ports.items()],
        "resources": head.resources(),
    }
    worker_container = {
        "name": "ray-worker",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": WORKER_ENV,
        # KubeRay's worker readiness probe checks the Serve proxy on the port named "serve".
        "ports": [{"name": "serve", "containerPort": listen.port}, {"name": "metrics", "containerPort": METRICS_PORT}],
        "resources": worker.resources(),
    }
    worker_pod: dict = {"containers": [worker_container]}
    if config.model is not None and Path(config.model).is_absolute():
        mount = opts.models_mount.rstrip("/")
        if not config.model.startswith(mount + "/"):
            raise ConfigError(f"{opts.config}: model {config.model} is not under {mount}/ (--models-mount)")
        worker_container["volumeMounts"] = [{"name": "models", "mountPath": mount, "readOnly": True}]
        claim = {"claimName": opts.models_pvc, "readOnly": True}
        worker_pod["volumes"] = [{"name": "models", "persistentVolumeClaim": claim}]
    if gpu:
        worker_pod["tolerations"] = GPU_TOLERATIONS

    worker_params = {"num-cpus": str(worker.cpus)}
    if gpu:
        worker_params["num-gpus"] = str(worker.gpus)
    worker_params["metrics-export-port"] = str(METRICS_PORT)

    doc = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "shardserve"}},
        "spec": {
            # A rayClusterConfig change starts a new cluster and moves traffic once it serves (blue/green).
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": _Literal(_dump(serve_cfg)),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": 60,
                    "imagePullPolicy": "IfNotPresent",
                    "resources": {"limits": dict(AUTOSCALER_RESOURCES), "requests": dict(AUTOSCALER_RESOURCES)},
                },
                "headGroupSpec": {
                    "rayStartParams": {
                        "num-cpus": "0",  # no replica, worker or Router is scheduled on the head
                        "dashboard-host": "0.0.0.0",
                        "metrics-export-port": str(METRICS_PORT),
                    },
                    "template": {"spec": {"containers": [head_container]}},
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu-workers" if gpu else "cpu-workers",
                        "replicas": min_pods,
                        "minReplicas": min_pods,
                        "maxReplicas": max_pods,
                        "rayStartParams": worker_params,
                        "template": {"spec": worker_pod},
                    }
                ],
            },
        },
    }
    return doc, config


def _header(opts: RenderOptions, doc: dict, config: AppConfig) -> str:
    image = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    group = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    lo, hi = serve_replica_range(config)
    _, _, how = replica_units(config)
    lines = [
        f"GENERATED by: {opts.command()}",
        f"Do not edit by hand: edit {opts.config} and render again (a test fails when they differ).",
        f"Image: {image} is a placeholder tag. Build k8s/Dockerfile, push it, and replace it",
        "everywhere below (or render with --image REGISTRY/shardserve:TAG); see k8s/README.md.",
        f"Serve runs {lo}..{hi} LLMServer replicas ({how});",
        f"worker group {group['groupName']!r} holds them in {group['minReplicas']}..{group['maxReplicas']} pods.",
    ]
    if config.model is not None and Path(config.model).is_absolute():
        lines.append(f"Weights: {config.model} comes from the PVC {opts.models_pvc!r} mounted at {opts.models_mount}.")
    return "".join(f"# {line}\n" for line in lines)


def render_rayservice(serve_config: dict, opts: RenderOptions) -> str:
    """The manifest text: a header saying how it was made, then the RayService."""
    doc, config = build_rayservice(serve_config, opts)
    if problems := operator_rule_errors(doc):
        raise ConfigError(f"{opts.config}: " + "; ".join(problems))
    check_resource_fit(doc)  # never write a manifest whose replicas cannot be placed
    return _header(opts, doc, config) + _dump(doc)


def render_file(opts: RenderOptions) -> str:
    path = Path(opts.config)
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return render_rayservice(data, opts)


# -- checking a manifest ------------------------------------------------------------------------


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
    from deployments.crd_schema import ManifestError, schema_errors

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
        from deployments.crd_schema import ManifestError

        raise ManifestError(str(path), [f"expected one YAML document, found {len(docs)}"])
    return check_manifest(docs[0], str(path))


# -- command line -------------------------------------------------------------------------------


def cmd_render(args: argparse.Namespace) -> int:
    opts = RenderOptions(**{f: getattr(args, f) for f in RenderOptions.__dataclass_fields__})
    text = render_file(opts)
    if opts.out:
        Path(opts.out).write_text(text)
        print(f"wrote {opts.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    for path in args.manifests:
        config = check_file(path)
        lo, hi = serve_replica_range(config)
        print(f"{path}: ok (RayService, {config.device}, tp={config.tensor_parallel_size} x "
              f"pp={config.pipeline_parallel_size}, {lo}..{hi} replicas)")  # fmt: skip
    return 0


def _add_commands(sub) -> None:
    render = sub.add_parser("render", help="write a KubeRay RayService manifest from a Serve/AppConfig YAML")
    render.add_argument("--config", required=True, help="Serve config YAML, the AppConfig under applications[0].args")
    render.add_argument("--gpu", action="store_true", help="GPU worker pods (the config must say device: cuda)")
    render.add_argument("--out", default=None, help="write here instead of stdout")
    render.add_argument("--name", default=None, help="RayService name (default: shardserve-<config file stem>)")
    render.add_argument("--image", default=None, help=f"container image (default: shardserve:{IMAGE_VERSION}-cpu|gpu)")
    render.add_argument("--head-cpus", type=int, default=None)
    render.add_argument("--head-memory", default=None, help="e.g. 2Gi")
    render.add_argument("--worker-cpus", type=int, default=None)
    render.add_argument("--worker-memory", default=None, help="e.g. 4Gi")
    render.add_argument("--worker-gpus", type=int, default=None, help="GPUs per worker pod (default: tp)")
    render.add_argument("--models-pvc", default="shardserve-models", help="PVC holding an absolute `model` path")
    render.add_argument("--models-mount", default="/models", help="where that PVC is mounted in worker pods")
    render.set_defaults(func=cmd_render)

    check = sub.add_parser("check", help="validate RayService manifests: CRD schema, Serve config, resource fit")
    check.add_argument("manifests", nargs="+")
    check.set_defaults(func=cmd_check)


def add_k8s_parser(subparsers) -> None:
    """Register `k8s render` and `k8s check` on the shardserve command's subparsers."""
    k8s = subparsers.add_parser("k8s", help="KubeRay manifests: render from a config, check against the CRDs")
    _add_commands(k8s.add_subparsers(dest="k8s_command", required=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployments.k8s", description="KubeRay RayService manifests.")
    _add_commands(parser.add_subparsers(dest="k8s_command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # config, schema, fit errors and a missing file say what is wrong
        print(f"shardserve k8s: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
