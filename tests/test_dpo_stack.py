"""tiny-ko-dpo end to end through Prefect on the real local stack (Prefect server, worker, MLflow server): a tiny-ko
champion in the stack's registry (the session's SFT adapter, registered as the register step does and promoted
through MLflow's REST API like the UI), then `prefect deployment run finetune/tiny-ko-dpo`, the shipped config with
fewer steps. The new version starts from that champion, prefers the chosen answers more often than its starting
point on the held-out pairs, is gated against it, and names its parent in the registry, on its MLflow run and in
`loraflow versions`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraflow.localstack.running import set_alias_like_the_ui, stable_root
from loraflow.registry.client import client_at
from loraflow.registry.download import adapter_sha
from loraflow.registry.promote import TAG_DECISION, TAG_REASONS
from loraflow.results import TrainResult
from tests.fixtures import RegistryFixture, RunningStack

pytestmark = pytest.mark.slow

# The shipped job, shorter: 8 optimizer steps of 8 pairs (the config trains one epoch, 30 steps), 10 items per
# benchmark. Serving stays off in the run, as the config has it; the version is served by hand at the end.
OVERRIDES = {"training.max_steps": 8, "training.save_steps": 100, "eval.benchmarks.limit": 10}


def test_dpo_from_the_champion_improves_preferences_and_records_its_parent(local_stack: RunningStack,
                                                                           trained: TrainResult) -> None:
    mlflow_url = local_stack.stack.mlflow_url
    client = client_at(mlflow_url)
    champion = RegistryFixture(mlflow_url, "tiny-ko", client.create_experiment("tiny-ko-sft")).register(
        Path(trained.adapter_dir))
    set_alias_like_the_ui(local_stack, champion)

    run = local_stack.run_deployment("finetune/tiny-ko-dpo", "--param", f"overrides={json.dumps(OVERRIDES)}",
                                     timeout=1200)

    [version] = client.search_model_versions("name='tiny-ko-dpo'")
    assert version.tags["parent_version"] == version.tags["lineage"] == f"tiny-ko/{champion}"
    assert version.tags["parent_adapter_sha"] == adapter_sha(Path(trained.adapter_dir))
    assert version.tags["training.method"] == "dpo"
    mlflow_run = client.get_run(version.run_id)
    assert mlflow_run.data.tags["parent_version"] == f"tiny-ko/{champion}"  # the run shows the chain too
    assert mlflow_run.data.params["training.init_from"] == "tiny-ko@champion"
    assert mlflow_run.data.tags["prefect.flow_run_id"] == str(run.id)
    metrics = mlflow_run.data.metrics
    start, tuned = metrics["start/preference_accuracy"], metrics["tuned/preference_accuracy"]
    print(f"[figures] preference accuracy on held-out pairs: base {metrics['base/preference_accuracy']:.3f}, "
          f"start {start:.3f}, tuned {tuned:.3f}; margin start {metrics['start/preference_margin']:.2f} -> "
          f"tuned {metrics['tuned/preference_margin']:.2f} nats")
    assert tuned > start, metrics
    assert metrics["tuned/preference_margin"] > metrics["start/preference_margin"]
    assert metrics["train/global_steps"] == 8 and "train/reward_accuracy" in metrics
    assert {"start/tiny_kobest_copa/acc", "tuned/tiny_kobest_copa/acc", "base/perplexity"} <= metrics.keys()
    # Gated against its starting point: the decision and its reasons are on the version.
    reasons = version.tags[TAG_REASONS].splitlines()
    assert version.tags[TAG_DECISION] in ("champion", "rejected")
    assert any(line.startswith(f"pass: preference_accuracy {tuned:.4g} vs start {start:.4g}") for line in reasons)
    listed = local_stack.cli("loraflow", "versions", "tiny-ko-dpo", "--tracking-uri", mlflow_url).stdout
    assert f"\tparent=tiny-ko/{champion}" in listed, listed

    # Served like any adapter: promoted in the UI, served under the job's stable name beside tiny-ko's adapters on
    # the same vLLM (same base and server settings), through the canary.
    set_alias_like_the_ui(local_stack, version.version, model="tiny-ko-dpo")
    local_stack.cli("loraflow", "serve", "configs/tiny-ko-dpo.yaml")
    try:
        assert stable_root(local_stack.endpoint_url, "tiny-ko-dpo") == f"tiny-ko-dpo-v{version.version}"
        assert client.get_model_version("tiny-ko-dpo", version.version).tags["serving.canary"] == "passed"
    finally:
        # tiny-ko too: with the endpoint up, the stack's reconciler serves the tiny-ko champion set above.
        local_stack.cli("loraflow", "serve", "configs/tiny-ko-dpo.yaml", "configs/tiny-ko.yaml", "--stop")
