"""The RayService document: serveConfigV2, a head that runs no model, and a worker group sized for Serve's replicas."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import yaml

from deployments.config import SERVE_ENV, AppConfig, ConfigError
from deployments.k8s.checks import operator_rule_errors
from deployments.k8s.fit import Resources, check_resource_fit, pods_needed, replica_units, serve_replica_range
from deployments.k8s.serve_config import cluster_serve_config
from deployments.placement import ROUTER_CPUS
from model.sources import HUB_ID

IMAGE_VERSION = "0.1.0"  # the shardserve version baked into the placeholder image tags
RAY_VERSION = version("ray")  # the cluster runs the Ray this package pins
# Port names KubeRay looks for on the head container; it builds the head Service from them.
HEAD_PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}
METRICS_PORT = HEAD_PORTS["metrics"]
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
# Every Ray container runs Serve the way shardserve does (HAProxy in front of the replicas).
SERVE_CONTAINER_ENV = [{"name": name, "value": value} for name, value in SERVE_ENV.items()]
# The pod's interface: gloo otherwise binds the hostname's address, which can be loopback in a pod.
WORKER_ENV = SERVE_CONTAINER_ENV + [{"name": "GLOO_SOCKET_IFNAME", "value": "eth0"}]
AUTOSCALER_RESOURCES = {"cpu": "500m", "memory": "512Mi"}
SHM_VOLUME = {"name": "dshm", "emptyDir": {"medium": "Memory"}}
SHM_MOUNT = {"name": "dshm", "mountPath": "/dev/shm"}
API_KEY_MOUNT, API_KEY_ITEM = "/var/run/secrets/shardserve", "api_key"  # where replicas find the API key
# A Hub model ID is downloaded into HF_HOME; on a hostPath every pod of a node shares one download, and a
# restarted pod finds it there. HF_TOKEN (gated models) comes from the Secret's key "token".
HF_CACHE_HOST_PATH, HF_CACHE_MOUNT = "/var/cache/shardserve/huggingface", "/var/cache/huggingface"
HF_TOKEN_ITEM = "token"
HF_CACHE_MOUNT_SPEC = {"name": "hf-cache", "mountPath": HF_CACHE_MOUNT}
# Ways a token could be written into serveConfigV2 in plain text (huggingface_hub reads both names).
HF_TOKEN_ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
INIT_RESOURCES = {"cpu": "100m", "memory": "64Mi"}


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
    api_key_secret: str | None = None
    hf_token_secret: str | None = None
    hf_cache_host_path: str = HF_CACHE_HOST_PATH

    def command(self) -> str:
        """The command line that renders exactly this manifest (it goes into the header)."""
        parts = ["shardserve", "k8s", "render", "--config", self.config]
        if self.gpu:
            parts.append("--gpu")
        defaults = RenderOptions(config=self.config)
        for field in ("name", "image", "head_cpus", "head_memory", "worker_cpus", "worker_memory", "worker_gpus",
                      "models_pvc", "models_mount", "api_key_secret", "hf_token_secret",
                      "hf_cache_host_path"):  # fmt: skip
            value = getattr(self, field)
            if value != getattr(defaults, field):
                parts += ["--" + field.replace("_", "-"), str(value)]
        if self.out:
            parts += ["--out", self.out]
        return shlex.join(parts)


def is_hub_model(config: AppConfig) -> bool:
    """`model` is a Hugging Face model ID (org/name[@revision]), fetched by the pods that load it."""
    return config.model is not None and HUB_ID.match(config.model) is not None


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

    def ignore_aliases(self, data) -> bool:
        return True  # a block used twice (the /dev/shm volume) is written out twice, not as &id/*id


_Dumper.add_representer(_Literal, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|"))


def _dump(doc) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)


def health_path(serve_cfg: dict) -> str:
    """Where the app answers /health, under its route prefix."""
    return serve_cfg["applications"][0].get("route_prefix", "/").rstrip("/") + "/health"


def build_rayservice(serve_config: dict, opts: RenderOptions) -> tuple[dict, AppConfig]:
    """The RayService document (a dict in manifest order) and the AppConfig it serves."""
    serve_cfg, config, listen = cluster_serve_config(serve_config, opts.config)
    if config.api_key is not None:
        raise ConfigError(f"{opts.config}: api_key would stand in plain text in serveConfigV2; put the key in a "
                          "Secret and render with --api-key-secret NAME")  # fmt: skip
    env_vars = (serve_cfg["applications"][0].get("runtime_env") or {}).get("env_vars") or {}
    if plain := [name for name in HF_TOKEN_ENV_NAMES if name in env_vars]:
        raise ConfigError(f"{opts.config}: runtime_env.env_vars.{plain[0]} would stand in plain text in serveConfigV2; "
                          "put the token in a Secret and render with --hf-token-secret NAME")  # fmt: skip
    hub = is_hub_model(config)
    if opts.hf_token_secret and not hub:
        raise ConfigError(f"{opts.config}: --hf-token-secret needs a Hugging Face model ID (org/name) as model, "
                          f"got {config.model!r}")  # fmt: skip
    if opts.api_key_secret:  # each replica reads the key from the mounted Secret
        serve_cfg["applications"][0]["args"]["api_key_file"] = f"{API_KEY_MOUNT}/{API_KEY_ITEM}"
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
        "env": SERVE_CONTAINER_ENV,
        "ports": [{"name": n, "containerPort": p} for n, p in head_ports.items()],
        "resources": head.resources(),
    }
    worker_container = {
        "name": "ray-worker",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": WORKER_ENV,
        "ports": [{"name": "serve", "containerPort": listen.port}, {"name": "metrics", "containerPort": METRICS_PORT}],
        "resources": worker.resources(),
        # The serve Service sends traffic to ready worker pods only: ready means the app's own /health
        # answers 200 through this pod's proxy, i.e. a replica would serve a request now (not
        # recovering, draining or failed). This replaces KubeRay's readiness probe, which asks only
        # whether the proxy is up; its liveness probe (the node's raylet) stays, so a model that is
        # recovering never restarts the pod.
        "readinessProbe": {
            "httpGet": {"path": health_path(serve_cfg), "port": "serve"},
            "periodSeconds": 5,
            "timeoutSeconds": 10,  # /health pings every worker of a gang (step_timeout_s, 5 s by default)
            "failureThreshold": 2,
            "successThreshold": 1,
        },
    }
    # /dev/shm as memory the pod's limit bounds: container runtimes give 64 MiB by default, too little for
    # Ray's object store and the TP ranks' shared-memory all-reduce.
    head_container["volumeMounts"] = [SHM_MOUNT]
    worker_container["volumeMounts"] = [SHM_MOUNT]
    worker_pod: dict = {"containers": [worker_container], "volumes": [SHM_VOLUME]}
    if opts.api_key_secret:
        item = {"key": API_KEY_ITEM, "path": API_KEY_ITEM}
        worker_pod["volumes"].append({"name": "api-key", "secret": {"secretName": opts.api_key_secret, "items": [item]}})
        worker_container["volumeMounts"].append({"name": "api-key", "mountPath": API_KEY_MOUNT, "readOnly": True})
    if config.model is not None and Path(config.model).is_absolute():
        mount = opts.models_mount.rstrip("/")
        if not config.model.startswith(mount + "/"):
            raise ConfigError(f"{opts.config}: model {config.model} is not under {mount}/ (--models-mount)")
        worker_container["volumeMounts"].append({"name": "models", "mountPath": mount, "readOnly": True})
        claim = {"claimName": opts.models_pvc, "readOnly": True}
        worker_pod["volumes"].append({"name": "models", "persistentVolumeClaim": claim})
    if hub:  # the replica's engine and its workers (worker pods only: the head runs no model) fetch the ID
        worker_container["env"] = worker_container["env"] + [{"name": "HF_HOME", "value": HF_CACHE_MOUNT}]
        if opts.hf_token_secret:  # optional: a public model needs no token, and the pod starts without the Secret
            ref = {"name": opts.hf_token_secret, "key": HF_TOKEN_ITEM, "optional": True}
            worker_container["env"].append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": ref}})
        worker_container["volumeMounts"].append(HF_CACHE_MOUNT_SPEC)
        host_path = {"path": opts.hf_cache_host_path, "type": "DirectoryOrCreate"}
        worker_pod["volumes"].append({"name": "hf-cache", "hostPath": host_path})
        # The kubelet creates the directory owned by root; the image runs as ray, which must write there.
        worker_pod["initContainers"] = [{
            "name": "hf-cache-owner",
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["chown", "ray:users", HF_CACHE_MOUNT],
            "securityContext": {"runAsUser": 0},
            "resources": {"limits": dict(INIT_RESOURCES), "requests": dict(INIT_RESOURCES)},  # keeps the pod Guaranteed
            "volumeMounts": [HF_CACHE_MOUNT_SPEC],
        }]  # fmt: skip
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
                    "template": {"spec": {"containers": [head_container], "volumes": [SHM_VOLUME]}},
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
    if is_hub_model(config):
        lines.append(f"Weights: {config.model} is downloaded once per node into the hostPath")
        lines.append(f"{opts.hf_cache_host_path} (HF_HOME={HF_CACHE_MOUNT} in the worker pods).")
    if opts.hf_token_secret:
        lines.append(f"HF token: the Secret {opts.hf_token_secret!r} (key {HF_TOKEN_ITEM!r}); a gated model needs it.")
    if opts.api_key_secret:
        lines.append(f"API key: the Secret {opts.api_key_secret!r} (key {API_KEY_ITEM!r}) must exist before apply.")
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
