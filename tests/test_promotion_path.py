"""A person's promotion reaches vLLM with nobody running a command: MLflow REST alias move (what the UI calls) ->
MLflow webhook -> loraflow's receiver -> Prefect event -> `serve/tiny-ko` trigger -> reconcile -> the router's
stable name. Then the fallback with the receiver down, and a vLLM killed with SIGKILL. Real local stack (Prefect
server, worker, MLflow server, receiver) and real vLLM; the tests run in file order on one serving pair.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psutil
import pytest
from prefect.client.schemas.filters import FlowRunFilter
from prefect.client.schemas.objects import StateType

from loraflow.localstack.lifecycle import recorded_process
from loraflow.localstack.running import set_alias_like_the_ui, stable_root, stack_record
from loraflow.process import stop_process, wait_for
from loraflow.registry.client import client_at
from loraflow.serving.names import versioned_name
from tests.fixtures import ALL_LINEAR, RegistryFixture, RunningStack, make_adapter

pytestmark = pytest.mark.slow

MODEL = "tiny-ko"  # the model of configs/tiny-ko.yaml, whose serve deployment carries the trigger


@pytest.fixture(scope="module")
def versions(local_stack: RunningStack, tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two adapter versions of `tiny-ko` registered through the stack's MLflow server, as runs would."""
    root = tmp_path_factory.mktemp("promotion-adapters")
    experiment = client_at(local_stack.stack.mlflow_url).create_experiment("promotion-path")
    registry = RegistryFixture(local_stack.stack.mlflow_url, MODEL, experiment)
    return [registry.register(make_adapter(tiny_base_dir, root / f"v{seed}", r=8, targets=ALL_LINEAR, seed=seed))
            for seed in (21, 22)]


def alias_events(stack: RunningStack, since: datetime) -> list[dict]:
    """The receiver's Prefect events for this model's alias moves since `since`, oldest first."""
    with stack.client() as client:
        events = client.request("POST", "/events/filter", json={"filter": {
            "event": {"name": ["mlflow.model_version_alias.created"]},
            "resource": {"id": [f"mlflow.registered-model.{MODEL}"]},
            "occurred": {"since": since.isoformat()}}, "limit": 50}).json()["events"]
    return sorted(events, key=lambda event: event["occurred"])


def test_alias_moves_through_mlflow_rest_reach_the_stable_name(local_stack: RunningStack, versions: list[str],
                                                                stack_router: str) -> None:
    with local_stack.client() as client:
        assert [s.active for s in client.read_deployment_by_name(f"serve/{MODEL}").schedules] == [True]
    since, seconds = datetime.now(UTC) - timedelta(seconds=5), []
    for version in (versions[0], versions[1]):
        set_alias_like_the_ui(local_stack, version)
        seconds.append(wait_for(lambda v=version: stable_root(stack_router) == versioned_name(MODEL, v), 180))
    print(f"[timing] alias set -> stable name serving it: {seconds}")
    # Each move went through the event path: the receiver emitted one event per move, and the trigger started a
    # `serve` run carrying that move's time that completed, whether or not the 60 s poll reconciled it first (under
    # load the poll can; the stable name alone cannot tell the two paths apart, and a triggered run still busy
    # after routing is not a missed move). No automation action failed (a bad parameter template fails there).
    events = alias_events(local_stack, since)
    assert [event["resource"]["mlflow.version"] for event in events] == [versions[0], versions[1]], events
    moved_at = {datetime.fromisoformat(event["payload"]["timestamp"]) for event in events}
    with local_stack.client() as client:
        deployment_id = client.read_deployment_by_name(f"serve/{MODEL}").id

    def triggered_runs_completed() -> bool:
        with local_stack.client() as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [deployment_id]}))
        done = {datetime.fromisoformat(str(r.parameters["promoted_at"])) for r in runs
                if r.parameters.get("promoted_at") and r.state and r.state.type == StateType.COMPLETED}
        print("[serve runs]", [(r.parameters.get("promoted_at"), r.state and r.state.name) for r in runs])
        return moved_at <= done

    wait_for(triggered_runs_completed, 300)
    with local_stack.client() as client:
        failed = client.request("POST", "/events/filter", json={
            "filter": {"event": {"name": ["prefect.automation.action.failed"]}}, "limit": 10}).json()["events"]
    assert not failed, failed
    reply = httpx.post(f"{stack_router}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "헌법 제1조는?"}], "max_tokens": 8})
    assert reply.status_code == 200 and reply.json()["model"] == versioned_name(MODEL, versions[1])


def test_with_the_receiver_down_the_polling_fallback_gets_there(local_stack: RunningStack, versions: list[str],
                                                                 stack_router: str) -> None:
    stop_process(recorded_process(local_stack.stack, "webhook"))
    set_alias_like_the_ui(local_stack, versions[0])
    seconds = wait_for(lambda: stable_root(stack_router) == versioned_name(MODEL, versions[0]), 60 + 120)
    print(f"[timing] alias set -> stable name serving it (polling fallback, receiver down): {seconds:.1f} s")
    local_stack.up()  # the receiver comes back; `up` starts only what is not running


def test_a_killed_vllm_is_restarted_and_the_stable_name_answers_again(local_stack: RunningStack,
                                                                      versions: list[str], stack_router: str) -> None:
    processes = stack_record(local_stack)["processes"]
    vllm = psutil.Process(processes["vllm"]["pid"])
    vllm.kill()  # SIGKILL, the leader alone, as the OOM killer would

    def answers() -> bool:
        try:
            reply = httpx.post(f"{stack_router}/v1/chat/completions", timeout=30, json={
                "model": MODEL, "messages": [{"role": "user", "content": "국회는?"}], "max_tokens": 4})
        except httpx.HTTPError:
            return False
        return reply.status_code == 200 and reply.json()["model"] == versioned_name(MODEL, versions[0])

    # The router's supervisor restarts vLLM at once and reloads its adapters (about 30 s here); the bound is
    # liveness, not speed (tests/test_serving_recovery.py prints the figures under concurrent requests).
    seconds = wait_for(answers, 480)
    print(f"[timing] vLLM SIGKILL -> stable name answers again: {seconds:.1f} s")
    after = stack_record(local_stack)["processes"]
    assert after["router"]["pid"] == processes["router"]["pid"] and after["vllm"]["pid"] != vllm.pid
    assert stack_record(local_stack)["endpoint"]["router_url"] == stack_router  # back on the same port
