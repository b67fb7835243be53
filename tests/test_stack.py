"""The local stack through the user's commands: real Prefect server, process worker and MLflow server.

The tests share one stack (tests/fixtures/stack.py) and run in file order; the last one restarts it.
Timings are printed (`pytest -s`) and written to LORAFLOW_HOME/timings.json.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import psutil
import pytest
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType

from loraflow.localstack.lifecycle import deploy, recorded_process
from loraflow.localstack.lifecycle import status as stack_status
from loraflow.localstack.prefect_api import ACCELERATOR_LIMIT, follow_flow_run
from tests.fixtures import TERMINAL, TEST_FLOWS_FILE, RunningStack
from tests.stackflows import PROBE_METRICS

pytestmark = pytest.mark.slow
# What the dependencies log on every run without asking anything of the user (loraflow.logs drops each).
DEPENDENCY_NOTICES = ("gemm_4bit", "`pretrained` model kwarg", "Overwriting default num_fewshot",
                      "system metrics monitoring", "Passed an already-initialized model")


def probe_record(stack: RunningStack, flow_run_id: UUID | str) -> dict[str, float | str]:
    return json.loads((stack.home / "stack-probe" / f"{flow_run_id}.json").read_text())


def run_deployment_cli(stack: RunningStack, name: str, *args: str, new_shell: bool = False) -> tuple[UUID, float]:
    """`prefect deployment run <name> ...`; returns the flow run id and when the command was started. `new_shell`:
    with no Prefect variable set, as a person types it after `loraflow up` (the profile must lead to the server)."""
    started = time.time()
    env = stack.new_shell_env() if new_shell else None
    output = stack.cli("prefect", "deployment", "run", name, *args, check=False, env=env)
    found = re.findall(r"UUID: ([0-9a-f-]{36})", output.stdout)
    assert found, f"no flow run created:\n{output.stdout}\n{output.stderr}"
    return UUID(found[0]), started


def log_timing(stack: RunningStack, name: str, seconds: float) -> None:
    stack.timings[name] = round(seconds, 2)
    (stack.home / "timings.json").write_text(json.dumps(stack.timings, indent=2))
    print(f"[timing] {name}: {seconds:.2f} s")


def test_servers_started_healthy(local_stack: RunningStack) -> None:
    for name in ("prefect-server", "mlflow-server", "worker", "deploy"):
        print(f"[timing] {name} ready: {local_stack.timings[name]:.1f} s")
    assert all(pid is not None for pid in stack_status(local_stack.stack).values())  # the reconciler too
    with local_stack.client() as client:
        # Every job config in configs/ has its deployments, made from the config: no block written by hand.
        for name in ("finetune/tiny-ko", "finetune/tiny-intent", "finetune/banking77-qwen1.5b", "parity/tiny-ko",
                     "parity/tiny-intent", "stack-probe/hold", "link-probe/link"):
            client.read_deployment_by_name(name)  # raises ObjectNotFound when not deployed
        limit = client.read_global_concurrency_limit_by_name(ACCELERATOR_LIMIT)
        pool = client.read_work_pool("loraflow")
        qwen = client.read_deployment_by_name("finetune/qwen-ko")
        parity = client.read_deployment_by_name("parity/tiny-ko")
    assert (limit.limit, pool.type) == (1, "process")
    assert qwen.parameters == {"config": "configs/qwen-ko.yaml"} and "qwen-ko" in qwen.description
    [schedule] = qwen.schedules
    # The weekly cron of the job's YAML is deployed, but this CPU-only machine cannot run a `model.device: cuda`
    # job: inactive.
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 3 * * 0", "Asia/Seoul", False)
    assert "finetune/qwen-ko/schedule: paused (this machine lacks the job's device)" in (
        local_stack.home / "run" / "schedules.log").read_text()
    # Served parity runs when a serve pass routes a new champion; no deployment concurrency slot can be left taken.
    assert parity.global_concurrency_limit is None and not parity.schedules


def test_deployment_run_logs_to_mlflow_and_links_both_ways(local_stack: RunningStack) -> None:
    """Typed in a new shell: no PREFECT_API_URL, only the `loraflow` profile that `up` made active."""
    # Without --watch: Prefect 3.7 watches through an event subscription that can miss a run's end and wait forever;
    # the run's state is read from the API below. The run must exist on the stack's server, not a temporary one.
    flow_run_id, requested = run_deployment_cli(local_stack, "link-probe/link", new_shell=True)
    flow_run = local_stack.wait_for_flow_run(flow_run_id)
    assert flow_run.state.type == StateType.COMPLETED, flow_run.state
    record = probe_record(local_stack, flow_run_id)
    log_timing(local_stack, "deployment run command -> flow start", float(record["started"]) - requested)
    log_timing(
        local_stack, "flow run created -> flow start", float(record["started"]) - flow_run.created.timestamp()
    )

    # MLflow side: the worker's MLFLOW_TRACKING_URI pointed the flow at the stack's server; the run names us.
    experiment = local_stack.mlflow(
        "GET", "experiments/get-by-name", params={"experiment_name": "stack-probe"}
    )
    runs = local_stack.mlflow(
        "POST",
        "runs/search",
        json={
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
        },
    )["runs"]
    assert [run["info"]["run_id"] for run in runs] == [record["mlflow_run_id"]]
    tags = {tag["key"]: tag["value"] for tag in runs[0]["data"]["tags"]}
    assert tags["prefect.flow_run_url"] == f"{local_stack.stack.prefect_ui_url}/runs/flow-run/{flow_run_id}"
    assert {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]} == PROBE_METRICS

    # Prefect side: a link to the MLflow run page and the metrics table.
    with local_stack.client() as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    by_key = {artifact.key: str(artifact.data) for artifact in artifacts}
    run_id, url = record["mlflow_run_id"], record["mlflow_url"]
    assert by_key["stack-probe-mlflow-run"] == f"[MLflow run {run_id}]({url})"
    assert str(record["mlflow_url"]).startswith(f"{local_stack.stack.mlflow_url}/#/experiments/")
    assert "| perplexity | 9.0000 | 7.5000 | -1.5000 |" in by_key["stack-probe-metrics"]


def test_concurrent_runs_serialize_on_accelerator_limit(local_stack: RunningStack) -> None:
    hold = 8.0
    with ThreadPoolExecutor(2) as pool:
        launched = list(
            pool.map(
                lambda _: run_deployment_cli(local_stack, "stack-probe/hold", "--param", f"seconds={hold}"),
                range(2),
            )
        )
    runs = [local_stack.wait_for_flow_run(flow_run_id) for flow_run_id, _ in launched]
    assert all(run.state.type == StateType.COMPLETED for run in runs), [run.state for run in runs]
    first, second = sorted((probe_record(local_stack, run.id) for run in runs), key=lambda r: r["entered"])
    # Both flows were running at the same time, so the limit (not the worker) kept them apart...
    assert second["started"] < first["left"], (first, second)
    # ...and their critical sections did not overlap: the second entered only after the first left.
    assert second["entered"] >= first["left"], (first, second)
    log_timing(local_stack, "second run waited for the accelerator", second["entered"] - second["started"])
    with local_stack.client() as client:
        assert client.read_global_concurrency_limit_by_name(ACCELERATOR_LIMIT).active_slots == 0


def test_scheduler_creates_runs_from_cron(local_stack: RunningStack) -> None:
    """`stack-probe/every-minute` (cron `* * * * *`), deployed at session start, gets runs that complete."""
    deadline = time.monotonic() + 150
    with local_stack.client() as client:
        deployment = client.read_deployment_by_name("stack-probe/every-minute")
        while True:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id={"any_": [deployment.id]})
            )
            done = [run for run in runs if run.state.type == StateType.COMPLETED]
            if done or time.monotonic() > deadline:
                break
            time.sleep(2)
        # Stop the schedule: later tests and sessions reusing this stack should not share the CPU with it.
        client.delete_deployment(deployment.id)
    assert done, [(run.name, run.state) for run in runs]
    assert all(run.auto_scheduled for run in done)
    assert done[0].expected_start_time.second == 0  # on the minute, as the cron says


def test_bad_override_fails_fast_naming_the_field(local_stack: RunningStack) -> None:
    work_before = sorted(p.relative_to(local_stack.home) for p in (local_stack.home / "work").rglob("*"))
    flow_run_id, requested = run_deployment_cli(
        local_stack, "finetune/qwen-ko", "--param", 'overrides={"training.learning_rate": -1}'
    )
    flow_run = local_stack.wait_for_flow_run(flow_run_id)
    assert flow_run.state.type == StateType.FAILED, flow_run.state
    assert "training.learning_rate" in flow_run.state.message, flow_run.state.message
    with local_stack.client() as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    assert task_runs == [], "no step may start before the config validates"
    assert (
        sorted(p.relative_to(local_stack.home) for p in (local_stack.home / "work").rglob("*")) == work_before
    )
    log_timing(
        local_stack, "bad override: deployment run -> failed", flow_run.end_time.timestamp() - requested
    )


def flow_run_processes(stack: RunningStack, flow_run_id: UUID) -> list[psutil.Process]:
    """The worker's child process running `flow_run_id`, and its descendants."""
    worker = recorded_process(stack.stack, "worker")
    assert worker is not None
    for child in worker.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.environ().get("PREFECT__FLOW_RUN_ID") == str(flow_run_id):
                return [child, *child.children(recursive=True)]
    return []


def test_killed_training_resumes_from_checkpoint_on_retry(local_stack: RunningStack) -> None:
    """Kill the flow run's process mid-training (SIGKILL: nothing gets to clean up), then `prefect flow-run
    retry`: the same run, same inputs, so the train step finds its content-addressed checkpoints."""
    # Serving has its own tests (tests/test_serving.py); here it would start vLLM on the default ports.
    overrides = json.dumps({"training.epochs": 1, "training.save_steps": 10, "serving.enabled": False})
    train_dir = local_stack.home / "work" / "train"
    earlier = set(train_dir.iterdir()) if train_dir.is_dir() else set()  # other modules' trainings on this stack
    flow_run_id, _ = run_deployment_cli(local_stack, "finetune/tiny-ko", "--param", f"overrides={overrides}",
                                        new_shell=True)
    deadline = time.monotonic() + 900
    while not (done := [p for p in train_dir.glob("*/checkpoints/checkpoint-*/trainer_state.json")
                        if p.parents[2] not in earlier]):
        run = local_stack.flow_run(flow_run_id)
        assert run.state.type not in TERMINAL, f"finished before a checkpoint was written: {run.state}"
        assert time.monotonic() < deadline, "no checkpoint after 900 s"
        time.sleep(1)
    victims = flow_run_processes(local_stack, flow_run_id)
    assert victims, "flow run process not found under the worker"
    for process in victims:
        process.kill()
    crashed = local_stack.wait_for_flow_run(flow_run_id, timeout=120)
    assert crashed.state.type == StateType.CRASHED, crashed.state
    [run_dir] = set(train_dir.iterdir()) - earlier
    assert not (run_dir / "train_metrics.json").exists(), "training finished before the kill"
    # Checkpoints complete when the process died (a later one may have been half written: never resumed from).
    saved = max(int(p.parent.name.rsplit("-", 1)[1]) for p in (run_dir / "checkpoints").glob("*/trainer_state.json"))
    assert saved >= int(done[0].parent.name.rsplit("-", 1)[1])

    local_stack.prefect("flow-run", "retry", str(flow_run_id))
    # The retry's own outcome: a terminal state newer than the crash, never the crash it was retried from.
    retried = local_stack.wait_for_flow_run(flow_run_id, timeout=1200, after=crashed)
    with local_stack.client() as client:
        history = [(h.type.value, h.message) for h in client.read_flow_run_states(flow_run_id)]
    worker_log = (local_stack.home / "logs" / "worker.log").read_text(errors="replace")[-4000:]
    assert retried.state.type == StateType.COMPLETED, (retried.state, history, worker_log)
    assert [t for t, _ in history].count("RUNNING") >= 2, history  # it really ran again
    # It resumed: the trainer's first step in the retried process came after the last complete checkpoint.
    metrics = json.loads((run_dir / "train_metrics.json").read_text())
    assert metrics["resumed_from_step"] == saved, (metrics, saved)
    assert metrics["steps_this_process"] == metrics["global_steps"] - saved, metrics
    history_after = json.loads((run_dir / "log_history.json").read_text())
    assert max(e["step"] for e in history_after if "loss" in e) > saved
    with local_stack.client() as client:
        assert client.read_global_concurrency_limit_by_name(ACCELERATOR_LIMIT).active_slots == 0

    # The run's logs, as the Prefect UI and `loraflow demo` show them: each step's progress and summary, and none
    # of the dependencies' notices that ask nothing of the user (the worker loads flows/finetune.py by path).
    lines: list[tuple[str, str]] = []
    follow_flow_run(local_stack.stack.prefect_api_url, flow_run_id,
                    lambda line, task: lines.append((task, line.message)))
    train_lines = [message for task, message in lines if task.startswith("train")]
    assert any(m.startswith("training: ") and "%" in m for m in train_lines), train_lines
    assert any(m.startswith("train: ") and "steps in" in m for m in train_lines), train_lines
    notices = [m for _, m in lines if any(n in m for n in DEPENDENCY_NOTICES)]
    assert not notices, notices


def test_restart_keeps_state_and_down_leaves_no_process(local_stack: RunningStack) -> None:
    with local_stack.client() as client:
        # Future runs of a schedule are recreated when `up` redeploys; finished runs must survive as they are.
        runs_before = {run.id for run in client.read_flow_runs() if run.state.type in TERMINAL}
        # A person pauses a schedule in the UI: no `up`, `down` or redeploy may resume it.
        hourly = client.read_deployment_by_name("stack-probe/hourly")
        client.update_deployment_schedule(hourly.id, hourly.schedules[0].id, active=False)
    experiments_before = local_stack.mlflow("POST", "experiments/search", json={"max_results": 100})[
        "experiments"
    ]

    stopped = local_stack.down()  # asserts every process it found is gone
    assert len(stopped) >= 3
    assert all(pid is None for pid in stack_status(local_stack.stack).values())
    # The CLI of a new shell is handed back to its earlier profile, not left pointing at a dead server.
    profiles = Path(local_stack.env["HOME"]) / ".prefect" / "profiles.toml"
    assert 'active = "loraflow"' not in profiles.read_text()

    restarted_at = datetime.now(UTC)
    timings = local_stack.up()
    log_timing(local_stack, "restart: prefect-server healthy", timings["prefect-server"])
    log_timing(local_stack, "restart: mlflow-server healthy", timings["mlflow-server"])
    assert 'active = "loraflow"' in profiles.read_text()
    deploy(local_stack.stack, base_file=TEST_FLOWS_FILE)  # the YAML says `active: true` again
    with local_stack.client() as client:
        assert runs_before <= {run.id for run in client.read_flow_runs()}
        qwen = client.read_deployment_by_name("finetune/qwen-ko")
        assert not qwen.schedules[0].active  # still no GPU here
        assert qwen.created < restarted_at  # the same deployment, updated in place
        assert not client.read_deployment_by_name("stack-probe/hourly").schedules[0].active
        client.delete_deployment(client.read_deployment_by_name("stack-probe/every-minute").id)
    experiments_after = local_stack.mlflow("POST", "experiments/search", json={"max_results": 100})[
        "experiments"
    ]
    assert {e["name"] for e in experiments_before} <= {e["name"] for e in experiments_after}
