"""What answers is what was judged: the finetune flow with serving on ends by scoring the served version through
the endpoint (lm-eval `local-completions`) and comparing it with the registered `tuned/...` metrics; a served model
that is not the judged one is flagged `serving.parity=failed` on the version, where the MLflow UI shows it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.finetune import finetune
from loraflow.config import load_config
from loraflow.evaluation.served_parity import DETAIL_TAG, PARITY_TAG, check_served_parity, compare
from loraflow.registry.client import client_at
from loraflow.results import RegisteredVersion
from loraflow.serving.client import ServerClient
from loraflow.serving.deploy import stop_job
from loraflow.serving.names import versioned_name
from loraflow.serving.records import read_job, read_server, running_endpoint
from tests.fixtures import ALL_LINEAR, TINY_CONFIG, TINY_OVERRIDES, free_port, make_adapter

pytestmark = pytest.mark.slow

MODEL = "tiny-ko-parity"
TASKS = ("tiny_kobest_boolq", "tiny_kobest_copa", "tiny_kobest_hellaswag")


@pytest.fixture(scope="module")
def overrides() -> dict[str, object]:
    return {**TINY_OVERRIDES, "registry.model_name": MODEL, "serving.enabled": True,
            "serving.port": free_port(), "serving.max_model_len": 512}


@pytest.fixture(scope="module")
def served_run(finetune_run: dict, overrides: dict[str, object]) -> Iterator[dict]:
    """The session's adapter (every step cached), registered under its own model name, served and checked."""
    try:
        yield finetune(config=TINY_CONFIG, overrides=overrides)
    finally:
        stop_job(load_config(TINY_CONFIG, overrides))


def _client(run: dict) -> MlflowClient:
    return client_at(run["tracking_uri"])


def test_served_version_scores_what_was_registered(served_run: dict) -> None:
    name = versioned_name(MODEL, served_run["version"])
    assert served_run["served_routes"] == {MODEL: name}
    parity = served_run["served_parity"]
    assert parity is not None and parity["served_name"] == name
    client = _client(served_run)
    metrics = client.get_run(served_run["run_id"]).data.metrics
    for task in TASKS:
        assert f"served/{task}/acc" in metrics and f"served/{task}/acc_stderr" in metrics
    compared = {m["metric"]: m for m in parity["metrics"]}
    assert {f"{task}/acc" for task in TASKS} <= set(compared)
    for metric, check in compared.items():
        # Served (vLLM, fp32 base + adapter) and registered (fp32 in-process) agree to within an item or two.
        assert abs(check["served"] - metrics[f"tuned/{metric}"]) <= 2 / 60 + 1e-9, check
        assert abs(check["served"] - check["registered"]) <= check["tolerance"], check
    assert parity["passed"]
    tags = client.get_model_version(MODEL, served_run["version"]).tags
    assert tags[PARITY_TAG] == "passed" and "tiny_kobest_copa/acc: served" in tags[DETAIL_TAG]


def test_a_different_adapter_under_the_versions_name_is_flagged(served_run: dict, overrides: dict[str, object],
                                                                 tiny_base_dir: Path, tmp_path: Path) -> None:
    job = load_config(TINY_CONFIG, overrides)
    name = versioned_name(MODEL, served_run["version"])
    endpoint, job_record = running_endpoint(), read_job(MODEL)
    assert endpoint is not None and job_record is not None
    server = read_server(job_record.server)
    assert server is not None
    # Not the judged adapter: random weights loaded under the version's name, as a stale or foreign copy would be.
    other = make_adapter(tiny_base_dir, tmp_path / "other", r=16, targets=list(ALL_LINEAR), seed=11)
    serving = ServerClient(server.url)
    serving.unload_adapter(name)
    serving.load_adapter(name, str(other))
    version = RegisteredVersion(model_name=MODEL, version=served_run["version"], run_id=served_run["run_id"],
                                experiment_id="", source="", tracking_uri=served_run["tracking_uri"], created=False)

    report = check_served_parity(job, version, endpoint.url, None)
    assert report is None, "an unchanged serving set-up is checked once per version"
    report = check_served_parity(job, version, endpoint.url, None, force=True)

    assert report is not None and not report.passed
    out = [m for m in report.metrics if not m.within]
    assert out, report.detail()
    tags = _client(served_run).get_model_version(MODEL, served_run["version"]).tags
    assert tags[PARITY_TAG] == "failed"
    assert all(f"{m.metric}: served {m.served:.4f} vs registered {m.registered:.4f}" in tags[DETAIL_TAG] for m in out)
    run = _client(served_run).get_run(served_run["run_id"])
    assert run.data.tags[PARITY_TAG] == "failed"
    # The run shows the latest check's numbers.
    assert all(run.data.metrics[f"served/{m.metric}"] == m.served for m in report.metrics)


def test_tolerance_is_per_task_from_its_standard_errors() -> None:
    served = {"copa/acc": 0.60, "copa/acc_stderr": 0.05, "copa/f1": 0.58, "boolq/acc": 0.5}
    registered = {"tuned/copa/acc": 0.65, "tuned/copa/acc_stderr": 0.06, "tuned/copa/f1": 0.70,
                  "tuned/boolq/acc": 0.5, "tuned/perplexity": 7.0}
    checks = {c.metric: c for c in compare(served, registered, stderr_multiple=1.0)}
    assert set(checks) == {"copa/acc", "copa/f1", "boolq/acc"}
    assert checks["copa/acc"].tolerance == checks["copa/f1"].tolerance == 0.06  # f1 has no stderr of its own
    assert checks["copa/acc"].within and not checks["copa/f1"].within
    assert checks["boolq/acc"].tolerance == 0.0 and checks["boolq/acc"].within  # equal: within even at zero
