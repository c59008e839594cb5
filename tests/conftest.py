"""Shared fixtures: one local Ray cluster per session, tiny random models, the real default model, and
the choice between the compiled CPU kernels and plain torch."""

from __future__ import annotations

import logging
import os

import pytest

from deployments.cli import LOCAL_SERVE_ENV, stop_haproxy
from model import cpu_kernels
from tests.ports import free_port
from tests.tiny_models import make_tiny_gpt2, make_tiny_llama
from tests.tiny_tokenizer import save_tiny_tokenizer

# Serve as `shardserve serve` runs it (HAProxy in front of the replicas). Ray Serve reads these when
# it is first imported, here in the test process as in every Ray process it starts. HAProxy's own
# stats and metrics ports move to free ones, so a `make serve` running beside the tests keeps its.
for _name, _value in LOCAL_SERVE_ENV.items():
    os.environ.setdefault(_name, _value)
os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(free_port()))
os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))


def pytest_collection_modifyitems(items):
    """Every test that starts Ray (through the ray_cluster fixture) carries the `ray` marker,
    so `make test-fast` (-m "not ray and not slow") leaves it out without anyone remembering to mark it."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture
def compiled_cpu_ops():
    """The compiled CPU kernels (model/csrc), loaded in this process."""
    if not cpu_kernels.enabled():
        pytest.skip(f"{cpu_kernels.SWITCH}=0")
    # g++ and ninja are part of the set-up here, so a failed build is a failure, not a skip.
    assert cpu_kernels.load(), "the CPU kernels did not build; see the warning logged above"


@pytest.fixture
def torch_cpu_ops(monkeypatch):
    """Plain torch ops only, as where the kernels cannot be built."""
    monkeypatch.setattr(cpu_kernels, "_loaded", False)


@pytest.fixture(params=["torch", "compiled"])
def cpu_ops(request):
    """Runs a test once through plain torch ops and once through the compiled CPU kernels."""
    request.getfixturevalue(f"{request.param}_cpu_ops")
    return request.param


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # Fast autoscaling and metrics for the tests; Serve and Ray read these when their processes start.
    os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    # Logical CPUs beyond the 2 physical cores: gangs in tests ask for fractional CPUs per worker.
    ctx = ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
    stop_haproxy(ctx.address_info["node_id"])


def _with_tokenizer(model_dir):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    save_tiny_tokenizer(model_dir, min(vocab, 320))
    return model_dir


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return _with_tokenizer(make_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return _with_tokenizer(make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2")))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The bundled SmolLM2-135M-Instruct, converted once into the safetensors cache."""
    from model.sources import resolve_model

    return resolve_model(None)
