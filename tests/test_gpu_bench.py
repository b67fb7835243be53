"""bench/gpu.py's code path on CPU (the tiny architecture with random weights, configs/tiny-ko.yaml) and
`loraflow plan --probe`, which measures with the same functions (loraflow/training/probe.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraflow.cli import main
from loraflow.config import load_config
from loraflow.data.build_dataset import build_dataset
from loraflow.data.format_chat import format_chat
from loraflow.data.keys import chat_key, dataset_key
from loraflow.outputs import run_step
from loraflow.registry.client import client_at
from loraflow.results import ChatResult, DatasetResult
from loraflow.training.probe import PROBE_STAGE, probe_job
from tests.fixtures import TINY_CONFIG

REPO = Path(__file__).resolve().parent.parent
REQUIRED_KEYS = {"gpu.device", "gpu.tokens_per_s", "gpu.peak_gib", "gpu.peak_vs_plan", "gpu.lora_vs_base",
                 "gpu.padding_free_speedup", "gpu.loss_padded", "gpu.loss_padding_free", "gpu.plan_gib"}
TINY_BATCH, TINY_MAX_LENGTH, TINY_EPOCHS = 8, 512, 2  # configs/tiny-ko.yaml's training section


def test_plan_probe_logs_its_measurement_to_the_jobs_experiment(tiny_base_dir, tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the job names no tracking_uri: this store, not the session's
    assert main(["plan", TINY_CONFIG, "--probe", "--steps", "2", "--rows", "100"]) == 0
    assert "probe: tiny-ko" in capsys.readouterr().out

    client = client_at(uri)
    experiment = client.get_experiment_by_name(load_config(TINY_CONFIG).registry.experiment)
    (run,) = client.search_runs([experiment.experiment_id], f"tags.`loraflow.stage` = '{PROBE_STAGE}'")
    metrics, params = run.data.metrics, run.data.params
    assert run.info.status == "FINISHED"
    assert metrics["probe/tokens_per_s"] > 0 and metrics["probe/seconds_per_step"] > 0
    assert metrics["probe/peak_gib"] > 0 and metrics["probe/plan_gib"] > 0
    assert metrics["probe/peak_vs_plan"] == pytest.approx(metrics["probe/peak_gib"] / metrics["probe/plan_gib"])
    assert metrics["probe/job_steps"] == TINY_EPOCHS * math.ceil(100 / TINY_BATCH)
    assert metrics["probe/projected_hours"] == pytest.approx(
        metrics["probe/job_steps"] * metrics["probe/seconds_per_step"] / 3600)
    assert params["probe.steps"] == "2" and params["probe.rows_source"] == "--rows"
    assert params["probe.device"] == "cpu" and params["probe.plan_mode"] == "qlora_nf4"
    assert "train/loss" in metrics  # watched live, as a training's run is


def test_probe_projects_onto_the_built_dataset(tiny_base_dir):
    job = load_config(TINY_CONFIG)
    key = dataset_key(job.data)
    dataset = run_step("dataset", key, DatasetResult, lambda out: build_dataset(job.data, out, key))
    ckey = chat_key(dataset, job.model, job.training)
    chat = run_step("chat", ckey, ChatResult, lambda out: format_chat(dataset, job.model, job.training, out, ckey))

    result = probe_job(job, steps=1)
    assert (result.rows_source, result.rows) == ("built dataset", chat.stats["train_rows"])
    assert result.job_steps == TINY_EPOCHS * math.ceil(result.rows / TINY_BATCH)
    assert result.fill == pytest.approx(chat.stats["train_tokens"] / result.rows / TINY_MAX_LENGTH)
    assert 0 < result.fill < 1  # conversations are shorter than max_length: the worst case bounds them
    # one optimizer step of worst-case rows: one padding-free row of batch x max_length tokens
    assert (result.measured.steps, result.measured.tokens) == (1, TINY_BATCH * TINY_MAX_LENGTH)
    assert result.measured.run_id is None  # no MLflow without tracking


@pytest.mark.slow  # trains three times and starts vLLM (in its own process)
def test_gpu_bench_runs_its_cpu_form(tiny_base_dir, tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, "bench/gpu.py", "--arch", "tiny", "--job", TINY_CONFIG, "--steps", "2",
         "--compare-steps", "2", "--serve-tokens", "16", "--json", str(out)],
        cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert figures.keys() >= REQUIRED_KEYS
    assert figures["gpu.device"] == "cpu" and figures["gpu.arch"] == "tiny"
    assert figures["gpu.steps"] == 2 and figures["gpu.tokens_per_s"] > 0
    assert figures["gpu.peak_gib"] > 0 and figures["gpu.plan_gib"] > 0
    assert figures["gpu.peak_vs_plan"] == pytest.approx(figures["gpu.peak_gib"] / figures["gpu.plan_gib"], rel=1e-3)
    # the same rows, the same adapter initialization, no dropout: only the batch layout differs
    assert figures["gpu.loss_padding_free"] == pytest.approx(figures["gpu.loss_padded"], rel=1e-4)
    assert figures["gpu.padding_free_speedup"] > 0
    assert figures["gpu.vllm_tokens_s.base"] > 0 and figures["gpu.lora_vs_base"] > 0
