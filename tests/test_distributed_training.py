"""Training on two processes (`training.num_processes: 2`): DDP over gloo on this CPU, launched by `accelerate
launch`, through the real flow and the real train step; killed mid-training, it resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from loraflow.config import ConfigError, load_config
from loraflow.data.keys import chat_key, dataset_key
from loraflow.outputs import load_result, run_step, step_dir
from loraflow.process import alive
from loraflow.registry.client import client_at
from loraflow.results import ChatResult, DatasetResult, TrainResult
from loraflow.training.distributed import WorkerFailed
from loraflow.training.keys import train_key
from loraflow.training.live_metrics import RUN_FILE, WORLD_SIZE_TAG, Tracking
from loraflow.training.train import train_adapter
from tests.fixtures import TINY_CONFIG, train_in_child

PERPLEXITY_ONLY = [{"metric": "perplexity", "higher_is_better": False, "min_gain_over_base": 0.0,
                    "min_gain_over_champion": None}]
# Two workers, 16 conversations per optimizer step; perplexity is the gate (lm-eval's benchmarks are tested
# elsewhere and cost minutes here). A model of its own: the session's tiny-ko champion (a whole epoch) would
# rightly beat these 16 steps, and a second tiny-ko version would change what the flow tests see.
TWO_PROCESSES = {"registry.model_name": "tiny-ko-ddp", "training.num_processes": 2, "training.max_steps": 16,
                 "training.save_steps": 8, "training.logging_steps": 2, "eval.benchmarks.tasks": [],
                 "promotion.require": PERPLEXITY_ONLY, "merge.enabled": False, "serving.enabled": False}
RESUME = {**TWO_PROCESSES, "training.max_steps": 12, "training.save_steps": 3, "training.logging_steps": 1}


@pytest.fixture(scope="module")
def two_process_run(tiny_base_dir: Path) -> dict:
    """The real flow, its training on two processes."""
    from flows.finetune import finetune

    return finetune(config=TINY_CONFIG, overrides=TWO_PROCESSES)


@pytest.fixture(scope="module")
def chat(two_process_run: dict) -> ChatResult:
    job = load_config(TINY_CONFIG, TWO_PROCESSES)
    dataset = load_result("dataset", dataset_key(job.data), DatasetResult)
    return load_result("chat", chat_key(dataset, job.model, job.training), ChatResult)


def test_two_processes_train_a_version_whose_run_says_world_size_2(two_process_run: dict) -> None:
    assert two_process_run["new_version"]
    assert two_process_run["train"]["world_size"] == 2
    assert two_process_run["train"]["global_steps"] == 16
    metrics = two_process_run["metrics"]
    assert metrics["tuned/perplexity"] < metrics["base/perplexity"], metrics
    client = client_at(two_process_run["tracking_uri"])
    run = client.get_run(two_process_run["run_id"])
    assert run.data.tags[WORLD_SIZE_TAG] == "2"
    assert run.data.params["training.num_processes"] == "2"
    assert run.data.metrics["train/world_size"] == 2
    # Live metrics come from rank 0 alone: one loss point per logging step, not one per process.
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(2, 17, 2)), steps
    assert two_process_run["promotion"]["passed"], two_process_run["promotion"]["reasons"]


def _crash(child: subprocess.Popen) -> None:
    """SIGKILL to the child's process group: the child and the accelerate launcher die at once. torchrun starts the
    workers in sessions of their own, out of the signal's reach; they must notice and exit by themselves."""
    launcher, *workers = sorted(psutil.Process(child.pid).children(recursive=True), key=lambda p: p.create_time())
    assert "accelerate.commands.launch" in launcher.cmdline()
    assert len(workers) == 2, [p.cmdline() for p in workers]
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    deadline = time.monotonic() + 20
    while (orphans := [p.pid for p in workers if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not orphans, f"workers {orphans} outlived their launcher"


def test_two_processes_killed_mid_training_resume_from_their_checkpoint(chat: ChatResult, tmp_path: Path) -> None:
    job = load_config(TINY_CONFIG, RESUME)
    key = train_key(chat, job.model, job.lora, job.quantization, job.training)
    out = step_dir("train", key)
    tracking = Tracking(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="live", run_name="live")
    child = train_in_child(chat, RESUME, tracking.uri, tmp_path)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file():
        assert child.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    _crash(child)
    assert not (out / "result.json").exists() and not (out / "adapter").exists()

    resumed = run_step("train", key, TrainResult, lambda o: train_adapter(
        chat, job.model, job.lora, job.quantization, job.training, o, key, tracking))
    saved = resumed.metrics["resumed_from_step"]
    assert saved >= 3 and resumed.metrics["world_size"] == 2
    assert resumed.metrics["global_steps"] == 12
    assert resumed.metrics["steps_this_process"] == 12 - saved  # the relaunched workers began after the checkpoint
    # The history continues the killed workers': steps never restart, and the ones past the checkpoint are new.
    steps = [e["step"] for e in json.loads(Path(resumed.log_history).read_text()) if "loss" in e]
    assert steps == list(range(1, 13)), steps
    run_id = json.loads((out / RUN_FILE).read_text())["run_id"]
    assert resumed.run_id == run_id
    live = [m.step for m in client_at(tracking.uri).get_metric_history(run_id, "train/loss")]
    assert max(live) == 12 and min(live) <= saved  # both launches' points, in one run


def test_a_failing_worker_raises_with_its_output_and_keeps_the_step_dir(chat: ChatResult, tmp_path: Path) -> None:
    job = load_config(TINY_CONFIG, {**TWO_PROCESSES, "lora.target_modules": ["not_a_module"]})
    with pytest.raises(WorkerFailed, match=r"(?s)accelerate launch exited with \d+.*not_a_module"):
        train_adapter(chat, job.model, job.lora, job.quantization, job.training, tmp_path, "k")
    assert (tmp_path / "worker_inputs.json").is_file()


def test_accelerate_config_must_exist() -> None:
    with pytest.raises(ConfigError, match=r"training\.accelerate_config: .*'nope\.yaml' is not a file"):
        load_config(TINY_CONFIG, {"training.accelerate_config": "nope.yaml"})
    assert load_config(TINY_CONFIG, {"training.accelerate_config": "ddp.yaml"}).training.accelerate_config
