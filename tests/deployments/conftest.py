"""One Serve instance for the serving tests: started once, shut down at the end of the session."""

from __future__ import annotations

import pytest

from tests.deployments.served_app import APP_ARGS, PROMPT, Served
from tests.ports import free_port
from tests.reference import hf_greedy


@pytest.fixture(scope="session")
def served(ray_cluster, tiny_llama_dir):
    from ray import serve

    from deployments.app import build_app, grpc_options
    from deployments.config import Listeners, parse_app_config

    config = parse_app_config({**APP_ARGS, "model": str(tiny_llama_dir)})
    listen = Listeners(host="127.0.0.1", port=free_port(), grpc_port=free_port())
    serve.start(http_options={"host": listen.host, "port": listen.port}, grpc_options=grpc_options(listen))
    serve.run(build_app(config), name="shardserve", route_prefix="/")
    yield Served(http=f"http://127.0.0.1:{listen.port}", grpc=f"127.0.0.1:{listen.grpc_port}")
    serve.shutdown()


@pytest.fixture(scope="session")
def reference_text(tiny_llama_dir):
    """transformers' greedy 8 tokens after PROMPT, as text."""
    from model.tokenizer import encode_prompt, load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    ref = hf_greedy(tiny_llama_dir, [encode_prompt(tok, PROMPT, raw=True)], 8)[0]
    return tok.decode(ref.token_ids, skip_special_tokens=True)
