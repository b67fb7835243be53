"""A champion promoted in the MLflow UI is parity-checked, not only the versions the finetune flow serves itself:
MLflow REST alias move (what the UI calls) -> webhook -> the stack's reconciler routes it -> event
`loraflow.champion.routed` -> `parity/tiny-ko` scores it through the endpoint -> `serving.parity` on the version
and `served/...` on its run, equal to the registered `tuned/...` within tolerance. Real local stack and real vLLM.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from prefect.client.schemas.filters import FlowRunFilter
from prefect.client.schemas.objects import FlowRun, StateType

from loraflow.config import load_config
from loraflow.evaluation.served_parity import DETAIL_TAG, KEY_TAG, PARITY_TAG, parity_key
from loraflow.localstack.running import TINY_KO, set_alias_like_the_ui, stable_root
from loraflow.localstack.serving_pass import CHAMPION_ROUTED
from loraflow.process import wait_for
from loraflow.registry.client import client_at
from loraflow.registry.register import register_adapter
from loraflow.serving.names import versioned_name
from tests.fixtures import TERMINAL, TINY_CONFIG, TINY_OVERRIDES, RunningStack

pytestmark = pytest.mark.slow

TASKS = ("tiny_kobest_boolq", "tiny_kobest_copa", "tiny_kobest_hellaswag")


@pytest.fixture(scope="module")
def judged_version(local_stack: RunningStack, step_results: dict) -> str:
    """The session's trained adapter with its real evaluation, registered through the stack's MLflow server by the
    register step's own function: a version with `tuned/...` metrics to compare with (a made-up adapter has none)."""
    job = load_config(TINY_CONFIG, {**TINY_OVERRIDES, "registry.tracking_uri": local_stack.stack.mlflow_url})
    # The training's live run is in the session's own store, not on this server: the version gets a run of its own.
    trained = step_results["trained"].model_copy(update={"run_id": None})
    return register_adapter(job, TINY_CONFIG, step_results["dataset"], step_results["chat"], trained,
                            step_results["evaluated"]).version


def finished_parity_run(stack: RunningStack, version: str) -> FlowRun | None:
    """A `parity/tiny-ko` run for `version` in a terminal state, if there is one yet."""
    with stack.client() as client:
        deployment_id = client.read_deployment_by_name(f"parity/{TINY_KO}").id
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [deployment_id]}))
    print("[parity runs]", [(r.parameters.get("version"), r.state and r.state.name) for r in runs])
    return next((r for r in runs if str(r.parameters.get("version")) == version
                 and r.state is not None and r.state.type in TERMINAL), None)


def events_since(stack: RunningStack, name: str, since: datetime) -> list[dict]:
    with stack.client() as client:
        return client.request("POST", "/events/filter", json={"filter": {
            "event": {"name": [name]}, "occurred": {"since": since.isoformat()}}, "limit": 50}).json()["events"]


def test_a_champion_promoted_through_mlflow_rest_is_parity_checked(local_stack: RunningStack, judged_version: str,
                                                                   stack_endpoint: str) -> None:
    since, started = datetime.now(UTC), time.monotonic()
    set_alias_like_the_ui(local_stack, judged_version)
    # Liveness only: the reconciler's pass loads the version and runs its canary, then the parity run scores
    # three 60-item tasks through the endpoint on 2 busy cores.
    wait_for(lambda: finished_parity_run(local_stack, judged_version) is not None, 1200)
    print(f"[timing] alias set -> parity/{TINY_KO} run finished: {time.monotonic() - started:.1f} s")
    run = finished_parity_run(local_stack, judged_version)
    assert run is not None and run.state is not None and run.state.type == StateType.COMPLETED, run and run.state

    assert stable_root(stack_endpoint) == versioned_name(TINY_KO, judged_version)
    client = client_at(local_stack.stack.mlflow_url)
    version = client.get_model_version(TINY_KO, judged_version)
    assert version.tags.get(PARITY_TAG) == "passed", version.tags.get(DETAIL_TAG)
    assert version.tags[KEY_TAG] == parity_key(load_config(TINY_CONFIG))  # what makes a second check a no-op
    metrics = client.get_run(version.run_id).data.metrics
    for task in TASKS:
        # Served (vLLM, fp32 base + adapter) and registered (fp32 in-process) agree to within an item or two.
        served, registered = metrics[f"served/{task}/acc"], metrics[f"tuned/{task}/acc"]
        assert abs(served - registered) <= 2 / 60 + 1e-9, (task, served, registered)
    # One announcement for the one new champion: the drift checks in between routed nothing new and emitted
    # nothing. No automation action failed (a bad parameter template of the trigger fails there).
    announced = [e for e in events_since(local_stack, CHAMPION_ROUTED, since)
                 if e["resource"]["prefect.resource.id"] == f"loraflow.served-model.{TINY_KO}"]
    assert [e["payload"]["version"] for e in announced] == [judged_version], announced
    assert not events_since(local_stack, "prefect.automation.action.failed", since)
