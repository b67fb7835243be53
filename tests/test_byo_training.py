"""A job written by `loraflow new` trains: each shape (ShareGPT, OpenAI tools, alpaca, prompt/response) goes through
the data steps and two training steps on the embedded base, its masks checked token by token; a text/label CSV
runs the whole flow with `loraflow run`, judged by held-out accuracy, its warnings on the MLflow run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_from_disk
from mlflow import MlflowClient

from loraflow.base.load import load_tokenizer
from loraflow.cli import main
from loraflow.config import load_config
from loraflow.data.preview import build_and_format
from loraflow.registry.client import tracking_uri
from loraflow.registry.register import WARNINGS_TAG
from loraflow.training.train import train_adapter
from tests.fixtures.byo_data import assert_mask_token_by_token, write_label_csv, write_shapes

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("shape", ["sharegpt", "tools", "alpaca", "prompt_response"])
def test_each_shape_builds_masks_and_trains(shape: str, tmp_path: Path, tiny_base_dir: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / f"{shape}.yaml"
    assert main(["new", "shape", "--data", str(write_shapes(tmp_path / "data")[shape]), "--output", str(config)]) == 0
    assert main(["data", str(config), "--rows", "1"]) == 0
    assert "⟦" in capsys.readouterr().out
    job = load_config(config, {"training.max_steps": 2, "training.logging_steps": 1})
    dataset, chat = build_and_format(job)  # cached: what `loraflow data` built
    tokenizer = load_tokenizer(job.model)
    records, tokenized = load_from_disk(dataset.dataset_dir)["train"], load_from_disk(chat.tokenized_dir)["train"]
    for record, row in zip(records, tokenized, strict=True):
        assert_mask_token_by_token(tokenizer, record, row["input_ids"], row["assistant_masks"])
    out = tmp_path / "train"
    out.mkdir()
    trained = train_adapter(chat, job.model, job.lora, job.quantization, job.training, out, "k")
    assert trained.metrics["global_steps"] == 2 and trained.metrics["last_logged_loss"] > 0
    assert (Path(trained.adapter_dir) / "adapter_model.safetensors").is_file()


def test_a_label_csv_runs_judged_by_held_out_accuracy(tmp_path: Path, tiny_base_dir: Path) -> None:
    """The issue's run: duplicated rows and a training too short to learn; the gate is the task's own metric and the
    MLflow run carries the warnings."""
    config = tmp_path / "intents.yaml"
    assert main(["new", "intents", "--data", str(write_label_csv(tmp_path / "intents.csv", copies=3)),
                 "--output", str(config)]) == 0
    sets = ["--set=training.max_steps=2", "--set=serving.enabled=false", "--set=eval.heldout.max_rows=4"]
    result = subprocess.run([str(Path(sys.executable).parent / "loraflow"), "run", str(config), *sets],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "heldout/accuracy" in result.stdout.split("promotion:", 1)[1].splitlines()[0]
    assert "build_dataset kept 72 of 218 rows" in result.stdout + result.stderr  # the Prefect log's warning
    job = load_config(config)
    client = MlflowClient(tracking_uri(job.registry))
    version = client.search_model_versions(f"name='{job.registry.model_name}'")[0]
    run = client.get_run(version.run_id)
    assert "build_dataset kept 72 of 218 rows" in run.data.tags[WARNINGS_TAG]
    assert run.data.tags["mlflow.note.content"].startswith("**loraflow warnings**")
    assert json.loads(run.data.params["promotion.require"])[0]["metric"] == "heldout/accuracy"
