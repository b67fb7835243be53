import json
import os
import signal
import time
from pathlib import Path

import bitsandbytes as bnb
import pytest
from peft import PeftConfig

from loraflow.config import load_config
from loraflow.config.lora import QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.outputs import run_step, step_dir
from loraflow.registry.client import client_at
from loraflow.results import TrainResult
from loraflow.training.keys import train_key
from loraflow.training.live_metrics import RUN_FILE, Tracking
from loraflow.training.models import load_base_model
from loraflow.training.train import train_adapter
from tests.fixtures import TINY_CONFIG, train_in_child


def test_qlora_training_lowers_loss_and_saves_a_small_adapter(trained):
    history = json.loads(Path(trained.log_history).read_text())
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) >= 5
    assert losses[-1] < 0.6 * losses[0], losses
    config = PeftConfig.from_pretrained(trained.adapter_dir)
    assert config.r == 16 and set(config.target_modules) >= {"q_proj", "down_proj"}
    assert trained.metrics["adapter_bytes"] < 1_000_000
    # the tokenizer travels with the adapter, carrying the template it was trained with
    saved = json.loads((Path(trained.adapter_dir) / "tokenizer_config.json").read_text())
    assert (
        "{% generation %}" in saved.get("chat_template", "")
        or (Path(trained.adapter_dir) / "chat_template.jinja").is_file()
    )


def test_base_is_loaded_in_4bit_with_the_cpu_repack_disabled(tiny_base_dir):
    model = load_base_model(
        ModelConfig(base="embedded:tiny-ko", device="cpu"), QuantizationConfig(method="nf4")
    )
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # two layers x seven projections
    assert all(layer.support_avx512bf16_for_cpu is False for layer in layers)
    assert layers[0].weight.quant_type == "nf4"


RESUME_OVERRIDES = {"training.max_steps": 40, "training.save_steps": 4, "training.logging_steps": 1}



def test_training_killed_mid_run_resumes_from_its_last_checkpoint(step_results, tmp_path, caplog):
    """A crash mid-training, then the retry: it resumes from the last complete checkpoint, and the MLflow run that
    showed the loss live while the first process trained goes on holding the points of both. Without a terminal
    (pytest's capture), its progress is a log line every few percent."""
    chat = step_results["chat"]
    tracking = Tracking(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="live", run_name="live")
    job = load_config(TINY_CONFIG, RESUME_OVERRIDES)
    key = train_key(chat, job.model, job.lora, job.quantization, job.training)
    checkpoints = step_dir("train", key) / "checkpoints"
    child = train_in_child(chat, RESUME_OVERRIDES, tracking.uri, tmp_path)
    deadline = time.monotonic() + 300
    while not (checkpoints / "checkpoint-8" / "trainer_state.json").is_file():
        assert child.poll() is None, "training process ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    # Live: the run already holds loss points while the process still trains.
    run_id = json.loads((step_dir("train", key) / RUN_FILE).read_text())["run_id"]
    live = [m.step for m in client_at(tracking.uri).get_metric_history(run_id, "train/loss")]
    assert live and child.poll() is None
    os.killpg(child.pid, signal.SIGKILL)  # a crash, not a clean stop
    child.wait()
    assert not (step_dir("train", key) / "result.json").exists()

    resumed = run_step(
        "train",
        key,
        TrainResult,
        lambda out: train_adapter(chat, job.model, job.lora, job.quantization, job.training, out, key, tracking),
    )
    assert resumed.run_id == run_id
    points = [m.step for m in client_at(tracking.uri).get_metric_history(run_id, "train/loss")]
    assert min(points) <= min(live) and max(points) == 40  # both processes' points, one run
    assert client_at(tracking.uri).get_metric_history(run_id, "system/cpu_utilization_percentage")
    assert resumed.metrics["resumed_from_step"] >= 8
    assert resumed.metrics["global_steps"] == 40
    assert resumed.metrics["steps_this_process"] == 40 - resumed.metrics["resumed_from_step"]
    # log history continues the killed run's, step numbers never restart at 1
    steps = [e["step"] for e in json.loads(Path(resumed.log_history).read_text()) if "loss" in e]
    assert steps == sorted(steps) and steps[0] == 1 and len(set(steps)) == len(steps)
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training: ")]
    assert progress and progress[-1].startswith("training: 100% (step 40/40, loss ") and len(progress) <= 10


def test_lora_targets_missing_from_the_model_fail_clearly(step_results, tmp_path):
    chat = step_results["chat"]
    job = load_config(TINY_CONFIG, {"lora.target_modules": ["not_a_module"], "training.max_steps": 1})
    with pytest.raises(ValueError, match="not_a_module"):
        train_adapter(chat, job.model, job.lora, job.quantization, job.training, tmp_path, "k")


def test_padding_free_batches_keep_conversations_apart(step_results, tiny_base_dir):
    """The default collator concatenates a batch into one row with per-conversation position_ids: the loss must be
    the padded batch's to float precision, which it is only if no conversation attends to another."""
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = load_from_disk(step_results["chat"].tokenized_dir)["train"].select(range(6))
    # Labels as SFTTrainer folds them in from the assistant mask.
    examples = [{"input_ids": r["input_ids"],
                 "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["assistant_masks"], strict=True)]}
                for r in rows]
    assert len({len(e["input_ids"]) for e in examples}) > 1, "rows of equal length prove nothing"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir), dtype=torch.float32).eval()
    losses = {}
    for padding_free in (False, True):
        batch = DataCollatorForLanguageModeling(pad_token_id=3, padding_free=padding_free)(examples)
        assert ("attention_mask" in batch) != padding_free
        with torch.no_grad():
            # use_cache=False as SFTTrainer.compute_loss sets it: with a cache, transformers does not look for
            # packed sequences in position_ids.
            losses[padding_free] = model(**batch, use_cache=False).loss.item()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)
    assert load_config(TINY_CONFIG).training.padding_free
