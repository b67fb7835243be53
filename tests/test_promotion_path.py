"""A person's promotion reaches serving with nobody running a command: MLflow REST alias move (what the UI calls) ->
MLflow webhook -> loraflow's receiver -> Prefect event -> the stack's reconciler -> a pass (recorded as a Prefect
event the UI lists) -> the job's stable name on the endpoint. Two moves 3 s apart end on the last; two jobs moved at
once both get there; the drift check gets there with the receiver down; a job file added to configs/ is deployed,
served and retired; a SIGKILLed vLLM comes back; a reconciler and a worker killed mid-pass leave nothing waiting
once `loraflow up` has run. Real local stack and real vLLM; the tests run in file order on one endpoint.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.states import Pending

from loraflow.localstack.lifecycle import recorded_process
from loraflow.localstack.running import set_alias_like_the_ui, stable_root
from loraflow.localstack.serving_pass import SERVING_PASS
from loraflow.process import stop_process, wait_for
from loraflow.registry.client import client_at
from loraflow.serving.names import versioned_name
from loraflow.serving.records import job_records, read_job, read_server
from tests.fixtures import ALL_LINEAR, RegistryFixture, RunningStack, make_adapter

pytestmark = pytest.mark.slow

MODEL, INTENT = "tiny-ko", "tiny-intent"  # the models of configs/tiny-ko.yaml and configs/tiny-intent.yaml


def register(stack: RunningStack, model: str, adapters: list[Path]) -> list[str]:
    """Adapter versions of `model` registered through the stack's MLflow server, as runs would."""
    client = client_at(stack.stack.mlflow_url)
    experiment = client.get_experiment_by_name("promotion-path") or client.create_experiment("promotion-path")
    registry = RegistryFixture(stack.stack.mlflow_url, model, getattr(experiment, "experiment_id", experiment))
    return [registry.register(adapter) for adapter in adapters]


@pytest.fixture(scope="module")
def adapters(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("promotion-adapters")
    return [make_adapter(tiny_base_dir, root / f"v{seed}", r=8, targets=ALL_LINEAR, seed=seed) for seed in (21, 22)]


@pytest.fixture(scope="module")
def versions(local_stack: RunningStack, adapters: list[Path]) -> list[str]:
    return register(local_stack, MODEL, adapters)


def alias_events(stack: RunningStack, model: str, since: datetime) -> list[dict]:
    """The receiver's Prefect events for this model's alias moves since `since`, oldest first."""
    with stack.client() as client:
        events = client.request("POST", "/events/filter", json={"filter": {
            "event": {"name": ["mlflow.model_version_alias.created"]},
            "resource": {"id": [f"mlflow.registered-model.{model}"]},
            "occurred": {"since": since.isoformat()}}, "limit": 50}).json()["events"]
    return sorted(events, key=lambda event: event["occurred"])


def serving_passes(stack: RunningStack, model: str, since: datetime) -> list[dict]:
    """The reconciler's recorded passes of `model` since `since` (Prefect events, as the UI's event feed shows
    them): each one's payload, oldest first."""
    with stack.client() as client:
        events = client.request("POST", "/events/filter", json={"filter": {
            "event": {"name": [SERVING_PASS]}, "resource": {"id": [f"loraflow.served-model.{model}"]},
            "occurred": {"since": since.isoformat()}}, "limit": 50}).json()["events"]
    return [event["payload"] for event in sorted(events, key=lambda event: event["occurred"])]


def answers(url: str, model: str) -> str | None:
    try:
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "model": model, "messages": [{"role": "user", "content": "국회는?"}], "max_tokens": 4})
    except httpx.HTTPError:
        return None
    return reply.json()["model"] if reply.status_code == 200 else None


def test_alias_moves_through_mlflow_rest_reach_the_stable_name(local_stack: RunningStack, versions: list[str],
                                                                stack_endpoint: str) -> None:
    since, seconds = datetime.now(UTC) - timedelta(seconds=5), []
    for version in versions:
        set_alias_like_the_ui(local_stack, version)
        seconds.append(wait_for(lambda v=version: stable_root(stack_endpoint) == versioned_name(MODEL, v), 180))
    print(f"[timing] alias set -> stable name serving it: {seconds}")
    # Each move went through the event path: one alias event per move, and a recorded pass named after it that
    # routed it (the Prefect UI's event feed lists them); no automation action failed.
    # (The Prefect server stores events in batches: they are listed a few seconds after they streamed.)
    wait_for(lambda: [e["resource"]["mlflow.version"] for e in alias_events(local_stack, MODEL, since)] == versions,
             60)
    def routed_by_their_passes() -> bool:
        routed = {(p["why"], p["routes"].get(MODEL)) for p in serving_passes(local_stack, MODEL, since)}
        return all((f"champion -> v{v}", versioned_name(MODEL, v)) in routed for v in versions)

    wait_for(routed_by_their_passes, 60)
    passes = serving_passes(local_stack, MODEL, since)
    print("[serving passes]", [(p["why"], p["routes"], p["seconds"]) for p in passes])
    with local_stack.client() as client:
        failed = client.request("POST", "/events/filter", json={
            "filter": {"event": {"name": ["prefect.automation.action.failed"]}}, "limit": 10}).json()["events"]
    assert not failed, failed
    assert answers(stack_endpoint, MODEL) == versioned_name(MODEL, versions[1])


def test_moves_3_s_apart_end_on_the_last_and_two_jobs_moved_at_once_both_get_there(
        local_stack: RunningStack, versions: list[str], adapters: list[Path], stack_endpoint: str) -> None:
    set_alias_like_the_ui(local_stack, versions[0])
    time.sleep(3)
    set_alias_like_the_ui(local_stack, versions[1])
    wait_for(lambda: stable_root(stack_endpoint) == versioned_name(MODEL, versions[1]), 180)
    time.sleep(5)  # a pass still running for the first move must not route it after the second
    assert stable_root(stack_endpoint) == versioned_name(MODEL, versions[1])

    # tiny-intent is a served job of configs/: its first promotion puts it on the running endpoint, beside tiny-ko
    # on the same vLLM (same base and server settings); tiny-ko moves at the same moment.
    [intent] = register(local_stack, INTENT, adapters[:1])
    set_alias_like_the_ui(local_stack, intent, model=INTENT)
    set_alias_like_the_ui(local_stack, versions[0])
    wait_for(lambda: (stable_root(stack_endpoint), stable_root(stack_endpoint, INTENT)) == (
        versioned_name(MODEL, versions[0]), versioned_name(INTENT, intent)), 300)
    ko, served_intent = read_job(MODEL, local_stack.home), read_job(INTENT, local_stack.home)
    assert ko is not None and served_intent is not None and ko.server == served_intent.server
    status = local_stack.cli("loraflow", "status").stdout
    assert f"base server    {ko.server}" in status and f"{INTENT}, {MODEL}" in status, status


def test_with_the_receiver_down_the_drift_check_gets_there(local_stack: RunningStack, versions: list[str],
                                                           stack_endpoint: str) -> None:
    stop_process(recorded_process(local_stack.stack, "webhook"))
    set_alias_like_the_ui(local_stack, versions[1])
    seconds = wait_for(lambda: stable_root(stack_endpoint) == versioned_name(MODEL, versions[1]), 120)
    print(f"[timing] alias set -> stable name serving it (drift check, receiver down): {seconds:.1f} s")
    local_stack.up()  # the receiver comes back; `up` starts only what is not running


def test_a_job_file_added_to_configs_is_deployed_served_and_retired(local_stack: RunningStack, adapters: list[Path],
                                                                    stack_endpoint: str) -> None:
    """A user's job: one YAML in configs/, `loraflow deploy`, and it has its deployments and is served when promoted
    in the UI; removing the file and deploying again retires them."""
    job_file = Path("configs/extra-job.yaml")
    config = yaml.safe_load(Path("configs/tiny-ko.yaml").read_text())
    config["name"], config["registry"] = "extra-job", {"model_name": "extra-job", "experiment": "extra-job"}
    job_file.write_text(yaml.safe_dump(config, allow_unicode=True))
    try:
        assert "deployed finetune/extra-job" in local_stack.cli("loraflow", "deploy").stdout
        with local_stack.client() as client:
            finetune = client.read_deployment_by_name("finetune/extra-job")
            client.read_deployment_by_name("parity/extra-job")
        assert finetune.parameters == {"config": "configs/extra-job.yaml"}

        [version] = register(local_stack, "extra-job", adapters[1:])
        set_alias_like_the_ui(local_stack, version, model="extra-job")
        wait_for(lambda: stable_root(stack_endpoint, "extra-job") == versioned_name("extra-job", version), 180)
        local_stack.cli("loraflow", "serve", str(job_file), "--stop")
        assert answers(stack_endpoint, "extra-job") is None and answers(stack_endpoint, MODEL) is not None
    finally:
        job_file.unlink(missing_ok=True)
    assert "retired finetune/extra-job (its job file is gone)" in local_stack.cli("loraflow", "deploy").stdout
    with local_stack.client() as client:
        names = {d.name for d in client.read_deployments()}
    assert "extra-job" not in names


def test_a_killed_vllm_is_restarted_and_the_stable_name_answers_again(local_stack: RunningStack,
                                                                      versions: list[str], stack_endpoint: str) -> None:
    server_id = {r.model: r.server for r in job_records(local_stack.home)}[MODEL]
    before = read_server(server_id, local_stack.home)
    assert before is not None
    psutil.Process(before.process["pid"]).kill()  # SIGKILL, the leader alone, as the OOM killer would
    # The endpoint's supervisor restarts vLLM at once and reloads every job's adapters; the bound is liveness, not
    # speed (tests/test_serving_recovery.py prints the figures under concurrent requests).
    seconds = wait_for(lambda: answers(stack_endpoint, MODEL) == versioned_name(MODEL, versions[1])
                       and answers(stack_endpoint, INTENT) is not None, 480)
    print(f"[timing] vLLM SIGKILL -> both jobs answer again: {seconds:.1f} s")
    after = read_server(server_id, local_stack.home)
    assert after is not None and after.process["pid"] != before.process["pid"] and after.port == before.port


def test_a_reconciler_and_a_worker_killed_mid_pass_leave_nothing_waiting(local_stack: RunningStack,
                                                                         versions: list[str],
                                                                         stack_endpoint: str) -> None:
    """What `make down` mid-pass or a crash leaves: runs that claim to run with no process behind them. `loraflow up`
    marks them Crashed, so nothing waits on them, and the next promotion and the next run go through."""
    since = datetime.now(UTC)
    held = local_stack.cli("prefect", "deployment", "run", "stack-probe/hold", "--param", "seconds=600").stdout
    wait_for(lambda: len(running(local_stack, since)) >= 1, 120)  # the worker's run holds the accelerator
    set_alias_like_the_ui(local_stack, versions[0])
    wait_for(lambda: any(p["why"].startswith("champion") for p in serving_passes(local_stack, MODEL, since)), 60)
    with local_stack.client() as client:  # what a worker killed between claiming a run and starting it leaves
        hold = client.read_deployment_by_name("stack-probe/hold")
        unstarted = client.create_flow_run_from_deployment(hold.id, parameters={"seconds": 0}, state=Pending())
    for name in ("reconciler", "worker"):  # SIGKILL, the whole family: nothing of them gets to clean up
        leader = recorded_process(local_stack.stack, name)
        assert leader is not None
        for process in [*leader.children(recursive=True), leader]:
            process.kill()
    local_stack.up()
    # Only those whose process is gone: the new worker may already run one the pass's event triggered (a parity run).
    orphans = [run.name for run in running(local_stack, since) if not run_process_alive(run.infrastructure_pid)]
    assert orphans == [], "runs of dead processes must not claim to run"
    with local_stack.client() as client:
        assert client.read_flow_run(unstarted.id).state.type == StateType.CRASHED
    wait_for(lambda: stable_root(stack_endpoint) == versioned_name(MODEL, versions[0]), 120)
    set_alias_like_the_ui(local_stack, versions[1])
    seconds = wait_for(lambda: stable_root(stack_endpoint) == versioned_name(MODEL, versions[1]), 120)
    print(f"[timing] after the kill and `loraflow up`: alias set -> served in {seconds:.1f} s; {held.strip()}")
    local_stack.run_deployment("stack-probe/hold", "--param", "seconds=0", timeout=300)  # the accelerator is free


def running(stack: RunningStack, since: datetime) -> list[FlowRun]:
    with stack.client() as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            start_time={"after_": since - timedelta(seconds=5)},
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))))


def run_process_alive(infrastructure_pid: str | None) -> bool:
    """A worker-started run's process (`pid` or `hostname:pid`) runs; a run the worker has not started yet has none."""
    pid = (infrastructure_pid or "").rpartition(":")[2]
    return not pid.isdigit() or psutil.pid_exists(int(pid))
