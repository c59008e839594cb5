"""The ``shardserve`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

from model.sampling import SamplingParams

DEMO_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about distributed systems.",
    "Explain tensor parallelism in one sentence.",
]


# Flags that override the same-named AppConfig field when given.
ENGINE_FLAGS = ("model", "tensor_parallel_size", "pipeline_parallel_size", "dtype", "device", "max_model_len")
SERVE_FLAGS = ("served_model_name", "num_replicas", "host", "port", "grpc_port", "api_key")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="AppConfig YAML (a Serve config file or a bare mapping)")
    p.add_argument("--model", default=None, help="HF directory, .gguf file, or omit for the bundled SmolLM2-135M-Instruct")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=None)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--address", default=None, help="join this Ray cluster instead of starting a local one")


def _app_config(args: argparse.Namespace):
    """The config file (or defaults) with the flags given on the command line laid over it."""
    from deployments.config import AppConfig, load_app_config, parse_app_config

    base = load_app_config(args.config) if args.config else AppConfig()
    flags = [name for name in ENGINE_FLAGS + SERVE_FLAGS if getattr(args, name, None) is not None]
    overrides = {name: getattr(args, name) for name in flags}
    if "num_replicas" in overrides:
        overrides["autoscaling"] = None  # a fixed count on the command line replaces the file's autoscaling
    return parse_app_config({**base.model_dump(), **overrides}, "command line")


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
    from model.tokenizer import encode_prompt

    async def one(item: dict) -> dict:
        source = item.get("messages", item.get("prompt"))
        ids = encode_prompt(engine.tokenizer, source, raw=args.raw)
        params = SamplingParams(
            max_tokens=item.get("max_tokens", args.max_tokens),
            temperature=item.get("temperature", args.temperature),
            top_p=item.get("top_p", args.top_p),
            top_k=item.get("top_k", args.top_k),
            seed=item.get("seed", args.seed),
        )
        text, token_ids, reason = "", [], None
        async for out in engine.generate(ids, params):
            text += out.text
            token_ids += out.token_ids
            reason = out.finish_reason
        return {"prompt": source, "text": text, "token_ids": token_ids, "finish_reason": reason}

    return await asyncio.gather(*(one(p) for p in prompts))


def cmd_generate(args: argparse.Namespace) -> int:
    from cluster.engine import LLMEngine

    prompts = _read_prompts(args)
    config = _app_config(args).engine_config()
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


def cmd_serve(args: argparse.Namespace) -> int:
    from ray import serve

    from deployments.app import build_app, grpc_options, served_name

    config = _app_config(args)
    ctx = _start_ray(args.address, dashboard=True)
    serve.start(http_options={"host": config.host, "port": config.port}, grpc_options=grpc_options(config))
    serve.run(build_app(config), name="shardserve", route_prefix="/")
    url = f"http://{config.host}:{config.port}"
    auth = f" -H 'Authorization: Bearer {config.api_key}'" if config.api_key else ""
    print(f"shardserve is up at {url}/v1 serving model {served_name(config)!r}", flush=True)
    if config.grpc_port is not None:
        print(f"  gRPC: {config.host}:{config.grpc_port} (deployments/proto/shardserve.proto)")
    print(f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
          f"-d '{{\"model\": \"{served_name(config)}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'")  # fmt: skip
    if ctx.dashboard_url:
        print(f"  Ray dashboard: http://{ctx.dashboard_url}  (Serve tab: replicas and requests)")
    print("Ctrl-C stops it.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        serve.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardserve", description="Sharded LLM serving on Ray.")
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
    srv.add_argument("--served-model-name", default=None)
    srv.add_argument("--num-replicas", type=int, default=None)
    srv.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    srv.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 9000)")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    srv.set_defaults(func=cmd_serve)

    from deployments.k8s import add_k8s_parser

    add_k8s_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="shardserve: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except ValueError as e:  # bad flags or layouts: say what is wrong, no traceback
        print(f"shardserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
