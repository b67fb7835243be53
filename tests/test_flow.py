import platform
import shutil
from importlib import metadata
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter

from flows.finetune import finetune
from loraflow import paths
from loraflow.registry.client import client_at
from loraflow.training.environment import FROZEN_ARTIFACT
from tests.fixtures import TINY_CONFIG, TINY_OVERRIDES

LINEAGE = (
    "dataset_sha",
    "template_sha",
    "base_model",
    "base_revision",
    "config_sha",
    "code_version",
    "flow_run_id",
)
CACHED_STEPS = ("build_dataset", "format_chat", "train", "evaluate")


def _client(run: dict) -> MlflowClient:
    return client_at(run["tracking_uri"])


def run_with_step_states(overrides: dict) -> tuple[dict, dict[str, str]]:
    """One flow run, and the Prefect state name of each of its tasks (`Cached`, `Completed`)."""
    state = finetune(config=TINY_CONFIG, overrides=overrides, return_state=True)
    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [state.state_details.flow_run_id]}))
    return state.result(), {run.task_key.rsplit("-", 1)[0]: run.state_name for run in task_runs}


def all_cached(states: dict[str, str]) -> bool:
    """Every content-keyed step came from Prefect's cache: what makes a rerun cheap (bench/pipeline.py times it)."""
    return all(states.get(step) == "Cached" for step in CACHED_STEPS)


def test_cold_run_registers_a_version_with_lineage_and_metrics(finetune_run, step_results):
    assert finetune_run["new_version"]
    assert finetune_run["tracking_uri"].startswith(f"sqlite:///{paths.home()}")
    client = _client(finetune_run)
    version = client.get_model_version("tiny-ko", finetune_run["version"])
    for tag in LINEAGE:
        assert version.tags.get(tag), tag
    assert version.tags["dataset_sha"] == step_results["dataset"].dataset_sha
    assert version.tags["template_sha"] == step_results["chat"].template_sha
    assert version.source.endswith("/adapter")
    run = client.get_run(version.run_id)
    assert run.data.metrics["tuned/perplexity"] < run.data.metrics["base/perplexity"]
    assert run.data.params["lora.r"] == "16"
    # The environment it trained in: torch/CUDA/GPU as params, the frozen package list as an artifact.
    assert run.data.params["env.torch"] == torch.__version__ and run.data.params["env.cuda"] == "none"
    assert run.data.params["env.gpu"] == "none" and run.data.params["env.python"] == platform.python_version()
    frozen = Path(client.download_artifacts(run.info.run_id, FROZEN_ARTIFACT)).read_text().splitlines()
    assert f"torch=={torch.__version__}" in frozen and f"peft=={metadata.version('peft')}" in frozen
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "config", "plots", "data", "eval", "train", "merged", "environment"} <= artifacts
    evals = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/comparison.md", "eval/comparison.png", "eval/base.lm_eval_results.json"} <= evals
    for task in ("tiny_kobest_boolq", "tiny_kobest_copa", "tiny_kobest_hellaswag"):
        assert f"base/{task}/acc" in run.data.metrics and f"tuned/{task}/acc" in run.data.metrics
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/loss_curve.png" in plots
    loss_history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(loss_history) >= 5 and loss_history[-1].value < loss_history[0].value


def test_auto_champion_policy_promotes_the_first_passing_version(finetune_run):
    assert finetune_run["promotion"]["passed"], finetune_run["promotion"]["reasons"]
    assert finetune_run["promotion"]["alias"] == "champion"
    champion = _client(finetune_run).get_model_version_by_alias("tiny-ko", "champion")
    assert str(champion.version) == finetune_run["version"]
    assert champion.tags["promotion.decision"]


def test_identical_rerun_is_cached_and_registers_no_new_version(finetune_run):
    again, states = run_with_step_states(TINY_OVERRIDES)
    assert again["version"] == finetune_run["version"] and not again["new_version"]
    assert again["metrics"] == finetune_run["metrics"]
    client = _client(finetune_run)
    assert len(client.search_model_versions("name='tiny-ko'")) == 1
    assert all_cached(states), states


def test_a_step_whose_files_are_gone_runs_again_and_the_rest_stay_cached(finetune_run, step_results):
    dataset_dir = Path(step_results["dataset"].path)
    shutil.rmtree(dataset_dir)  # someone cleaned work/; Prefect's record of it is still there
    again, states = run_with_step_states(TINY_OVERRIDES)
    assert states["build_dataset"] == "Completed" and (dataset_dir / "result.json").is_file(), states
    assert all(states[step] == "Cached" for step in CACHED_STEPS[1:]), states  # same content, same keys
    assert again["version"] == finetune_run["version"] and not again["new_version"]


def test_changing_a_lora_field_retrains_but_reuses_dataset_and_chat(finetune_run):
    work = paths.work_dir()
    before = {step: set(p.name for p in (work / step).iterdir()) for step in ("dataset", "chat", "train")}
    changed = finetune(
        config=TINY_CONFIG, overrides={**TINY_OVERRIDES, "lora.r": 8, "training.max_steps": 10}
    )
    after = {step: set(p.name for p in (work / step).iterdir()) for step in ("dataset", "chat", "train")}
    assert after["dataset"] == before["dataset"] and after["chat"] == before["chat"]
    assert len(after["train"] - before["train"]) == 1
    assert changed["new_version"] and changed["version"] != finetune_run["version"]


@pytest.mark.slow  # three runs of the real flow
def test_a_directory_source_retrains_exactly_when_new_data_lands(tmp_path: Path, tiny_job) -> None:
    """Scheduled retraining on a folder that data lands in: an unchanged run is a cached no-op; a new file trains
    a new version, judged against the champion, whose lineage says which data changed."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    rows = Path("data/tiny-ko/constitution_qa.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (incoming / "week1.jsonl").write_text("".join(rows[:200]), encoding="utf-8")
    overrides = {**TINY_OVERRIDES, "registry.model_name": "tiny-ko-weekly", "training.max_steps": 8,
                 "data.sources": [{"path": str(incoming), "fields": {"prompt": "instruction", "response": "output"}}],
                 "merge.enabled": False, "eval.benchmarks.tasks": [], "promotion.require": []}

    first, cold = run_with_step_states(overrides)
    second, unchanged = run_with_step_states(overrides)
    assert (first["new_version"], second["new_version"], second["version"]) == (True, False, first["version"])
    assert not any(state == "Cached" for state in cold.values()) and all_cached(unchanged), (cold, unchanged)

    (incoming / "week2.jsonl").write_text("".join(rows[200:]), encoding="utf-8")  # the week's new data
    third, new_data = run_with_step_states(overrides)
    assert new_data["build_dataset"] != "Cached" and new_data["train"] != "Cached", new_data
    assert third["new_version"] and third["version"] != first["version"]
    client = _client(third)
    v1 = client.get_model_version("tiny-ko-weekly", first["version"]).tags
    v2 = client.get_model_version("tiny-ko-weekly", third["version"]).tags
    assert v1["dataset_sha"] != v2["dataset_sha"]
    assert v1["data.sources.0.manifest_sha"] != v2["data.sources.0.manifest_sha"]
    assert v2["promotion.compared_with"] == first["version"]  # judged against the champion, v1
    report = Path(client.download_artifacts(third["run_id"], "data/changes_since_champion.md", str(tmp_path)))
    assert "week2.jsonl" in report.read_text(encoding="utf-8")
