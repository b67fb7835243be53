"""Jobs from files: every job config in configs/ (and any other file a person names with `loraflow deploy PATH`)
gets its Prefect deployments from the config itself, with no block written by hand:

- `finetune/<job>`: the DAG, on the job's `schedule` (cron + time zone) when it has one;
- `parity/<job>`, for a served job: served parity of a champion a serve pass routed (`loraflow.champion.routed`).

A served job's promotions need no deployment: the stack's reconciler (`loraflow serve --follow`) serves every
served job. `loraflow up` and `loraflow deploy` write them into LORAFLOW_HOME/run/prefect.yaml (what all share comes
from deployments/prefect.yaml: pull step, work pool) and run `prefect deploy --all` on it, as a person would; the
deployments of a job whose file is gone are retired. run/jobs.json lists what is deployed, for the reconciler.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from loraflow.config import ConfigError, JobConfig, load_config
from loraflow.localstack.serving_pass import CHAMPION_ROUTED
from loraflow.localstack.stack import REPO_ROOT, Stack

CONFIGS = REPO_ROOT / "configs"
JOBS_FILE = "jobs.json"
GENERATED_TAG = "loraflow-job"  # on every deployment made here: what `retire` may delete


@dataclass(frozen=True)
class DeployedJob:
    name: str
    config: str  # the deployments' `config` parameter: repo-relative inside the repo, else absolute
    model: str
    serving: bool


def config_parameter(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def job_files(stack: Stack, extra: list[str] = ()) -> list[Path]:
    """configs/*.yaml that are jobs (a top-level `name`), and the extra files deployed before or named now."""
    remembered = _read(stack).get("extra", [])
    files = [p for p in sorted(CONFIGS.glob("*.yaml")) if isinstance(_top(p), dict) and "name" in _top(p)]
    for path in [*remembered, *extra]:
        if Path(path).resolve() not in [f.resolve() for f in files]:
            files.append(Path(path))
    return files


def _top(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def read_jobs(files: list[Path]) -> tuple[dict[Path, JobConfig], list[str]]:
    """The job of each file that exists and validates; the errors of the others (each naming its file and field)."""
    jobs, errors, names = {}, [], {}
    for path in files:
        if not path.is_file():
            continue  # removed: its deployments are retired
        try:
            job = load_config(path)
        except ConfigError as error:
            errors.append(str(error))
            continue
        if job.name in names:
            errors.append(f"{path}: job name {job.name!r} is already {names[job.name]}'s: a job's deployments are "
                          "named after it, so names are unique")
            continue
        names[job.name] = path
        jobs[path] = job
    return jobs, errors


def _description(path: Path, job: JobConfig) -> str:
    """The first line of the config's header comment (after the schema line), else the job's name."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") and "$schema" not in line and line.strip("# "):
            return f"{line.strip('# ')} ({config_parameter(path)})"
        if not line.startswith("#"):
            break
    return f"{job.name} ({config_parameter(path)})"


def deployments_of(path: Path, job: JobConfig) -> list[dict[str, Any]]:
    config = config_parameter(path)
    pool = {"name": "loraflow", "work_queue_name": "default"}
    finetune: dict[str, Any] = {
        "name": job.name, "entrypoint": "flows/finetune.py:finetune", "description": _description(path, job),
        "tags": ["finetune", job.name, GENERATED_TAG], "parameters": {"config": config}, "work_pool": pool}
    if job.schedule is not None:
        finetune["schedules"] = [{"cron": job.schedule.cron, "timezone": job.schedule.timezone, "slug": "schedule",
                                  "active": job.schedule.active}]
    made = [finetune]
    if job.checks_served_parity:
        model = job.registry.model_name
        made.append({
            "name": job.name, "entrypoint": "flows/parity.py:parity",
            "description": f"Served parity of a {model} champion routed by the stack's reconciler ({config}).",
            "tags": ["parity", job.name, GENERATED_TAG], "parameters": {"config": config}, "work_pool": pool,
            "triggers": [{"type": "event", "enabled": True,
                          "match": {"prefect.resource.id": f"loraflow.served-model.{model}"},
                          "expect": [CHAMPION_ROUTED],
                          "parameters": {"config": config, "version": "{{ event.payload.version }}"}}]})
    return made


def write_prefect_file(stack: Stack, base_file: Path, jobs: dict[Path, JobConfig], extra: list[str]) -> Path:
    """run/prefect.yaml: deployments/prefect.yaml (shared settings, any deployment a person wrote there) plus the
    generated deployments; run/jobs.json: what they are."""
    base = yaml.safe_load(base_file.read_text(encoding="utf-8")) or {}
    generated = [d for path, job in jobs.items() for d in deployments_of(path, job)]
    document = {**base, "deployments": [*(base.get("deployments") or []), *generated]}
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    target = stack.run_dir / "prefect.yaml"
    target.write_text("# Generated by `loraflow deploy` from the job configs: edit those, not this file.\n"
                      + yaml.safe_dump(document, sort_keys=False, allow_unicode=True), encoding="utf-8")
    remembered = [config_parameter(Path(p)) for p in [*_read(stack).get("extra", []), *extra]
                  if Path(p).is_file() and not Path(p).resolve().is_relative_to(CONFIGS)]
    listing = {"jobs": [asdict(DeployedJob(job.name, config_parameter(path), job.registry.model_name,
                                           job.serving.enabled)) for path, job in jobs.items()],
               "extra": sorted(set(remembered))}
    (stack.run_dir / JOBS_FILE).write_text(json.dumps(listing, indent=2))
    return target


def _read(stack: Stack) -> dict[str, Any]:
    file = stack.run_dir / JOBS_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def deployed_jobs(stack: Stack) -> list[DeployedJob]:
    """What the last `loraflow up` / `loraflow deploy` deployed (the reconciler serves the ones with serving)."""
    return [DeployedJob(**job) for job in _read(stack).get("jobs", [])]


def generated_names(jobs: dict[Path, JobConfig]) -> set[str]:
    """`flow/deployment` of every deployment the jobs make."""
    return {f"{d['entrypoint'].rsplit(':', 1)[1]}/{d['name']}" for path, job in jobs.items()
            for d in deployments_of(path, job)}
