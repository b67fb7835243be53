"""The user's own task end to end: tiny-intent (ten Korean banking intents, a `text,label` CSV with integer ids)
through the finetune flow, gated on held-out accuracy, with the confusion matrix in MLflow."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.finetune import finetune
from loraflow.config import load_config
from loraflow.registry.client import client_at
from loraflow.serving.deploy import stop_job
from tests.fixtures import free_port

pytestmark = pytest.mark.slow

CONFIG = "configs/tiny-intent.yaml"


@pytest.fixture(scope="module")
def intent_run(tiny_base_dir) -> dict:
    return finetune(config=CONFIG, overrides={"serving.enabled": False})  # served below, once judged


def test_tuned_accuracy_beats_base_and_passes_the_gate(intent_run: dict) -> None:
    metrics = intent_run["metrics"]
    assert metrics["eval/heldout_rows"] >= 50
    assert metrics["tuned/heldout/accuracy"] >= 0.8
    assert metrics["tuned/heldout/accuracy"] - metrics["base/heldout/accuracy"] >= 0.5
    # lm-eval's exact_match and the label-set accuracy judge the same stripped answers.
    assert metrics["tuned/heldout/accuracy"] == pytest.approx(metrics["tuned/heldout/exact_match"])
    assert 0 < metrics["tuned/heldout/macro_f1"] <= 1
    assert intent_run["train"]["train_examples_per_second"] > 0
    promotion = intent_run["promotion"]
    assert promotion["passed"] and promotion["alias"] == "champion"
    assert any(line.startswith("pass: heldout/accuracy") and ">= 0.8" in line for line in promotion["reasons"])


def test_confusion_matrix_and_label_set_land_in_mlflow(intent_run: dict) -> None:
    client = client_at(intent_run["tracking_uri"])
    run_id = intent_run["run_id"]
    names = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, "eval")}
    for label in ("base", "tuned"):
        assert {f"{label}.heldout_confusion.png", f"{label}.heldout_confusion.csv",
                f"{label}.heldout_per_class.csv", f"{label}.heldout_confused_pairs.md"} <= names
    assert {"heldout_rows.jsonl", "heldout_labels.json"} <= names
    stats = json.loads(Path(client.download_artifacts(run_id, "data/stats.json")).read_text())
    assert len(stats["labels"]["label"]) == 10
    metrics = client.get_run(run_id).data.metrics
    assert metrics["tuned/heldout/accuracy"] == pytest.approx(intent_run["metrics"]["tuned/heldout/accuracy"])


@pytest.fixture(scope="module")
def served_intent_run(intent_run: dict) -> Iterator[dict]:
    """The same version (every step cached) served through the endpoint; served parity scores the held-out rows."""
    overrides = {"serving.port": free_port()}
    try:
        yield finetune(config=CONFIG, overrides=overrides)
    finally:
        stop_job(load_config(CONFIG, overrides))


def test_served_accuracy_through_the_endpoint_equals_the_registered_one(served_intent_run: dict,
                                                                      intent_run: dict) -> None:
    assert served_intent_run["version"] == intent_run["version"]
    parity = served_intent_run["served_parity"]
    assert parity is not None and parity["passed"], parity
    compared = {m["metric"]: m for m in parity["metrics"]}
    assert compared["heldout/accuracy"]["served"] == pytest.approx(intent_run["metrics"]["tuned/heldout/accuracy"])
    metrics = client_at(intent_run["tracking_uri"]).get_run(intent_run["run_id"]).data.metrics
    assert metrics["served/heldout/accuracy"] == pytest.approx(metrics["tuned/heldout/accuracy"])
