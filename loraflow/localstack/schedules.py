"""Schedules belong to the machine that can run them and to the person who paused them.

`prefect deploy` recreates every schedule as the job's YAML says (Prefect deletes a deployment's schedules on each
upsert), so after each deploy `settle` puts back what the YAML cannot know:
- a schedule a person paused (in the UI or `prefect deployment schedule pause`) stays paused;
- a finetune job's schedule stays inactive on a machine without the job's device (qwen-ko's `model.device: cuda`
  on a CPU-only stack), and is activated by a later `up` on a machine that has it.
Schedules are told apart by deployment and `slug` (loraflow/localstack/jobs.py sets it). What loraflow paused for
a missing device is recorded in run/schedules.json, so it is never mistaken for a person's pause.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

RECORD = "schedules.json"


@dataclass(frozen=True)
class Schedule:
    key: str  # flow/deployment/slug
    flow: str
    deployment_id: UUID
    schedule_id: UUID
    active: bool
    config: str | None  # the deployment's `config` parameter


def read_schedules(api_url: str) -> list[Schedule]:
    found = []
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        flows: dict[UUID, str] = {}
        for deployment in client.read_deployments():
            flow = flows.setdefault(deployment.flow_id, client.read_flow(deployment.flow_id).name)
            for index, schedule in enumerate(deployment.schedules):
                found.append(Schedule(key=f"{flow}/{deployment.name}/{schedule.slug or index}", flow=flow,
                                      deployment_id=deployment.id, schedule_id=schedule.id, active=schedule.active,
                                      config=(deployment.parameters or {}).get("config")))
    return found


def settle(api_url: str, run_dir: Path, before: list[Schedule], device_present: Callable[[str], bool]) -> list[str]:
    """Activate or pause each schedule as the rules above say; returns one line per schedule changed."""
    record = run_dir / RECORD
    device_paused = set(json.loads(record.read_text())) if record.is_file() else set()
    was_active = {s.key: s.active for s in before}
    changes, paused_for_device = [], set()
    for schedule in read_schedules(api_url):
        want, why = schedule.active, ""
        if schedule.config is not None and not device_present(schedule.config):
            # Recorded on every pass, paused or not, so a later `up` never takes it for a person's pause.
            want, why = False, "this machine lacks the job's device"
            paused_for_device.add(schedule.key)
        elif was_active.get(schedule.key) is False and schedule.key not in device_paused:
            want, why = False, "paused by a person"
        if want != schedule.active:
            with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
                client.update_deployment_schedule(schedule.deployment_id, schedule.schedule_id, active=want)
            changes.append(f"schedule {schedule.key}: {'active' if want else 'paused'} ({why})")
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(sorted(paused_for_device)))
    return changes
