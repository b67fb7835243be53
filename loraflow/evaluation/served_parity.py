"""served_parity: after deploy, score what answers. The configured lm-eval tasks run through the OpenAI-compatible
API (lm-eval's `local-completions`, on the version's served name, through the endpoint as clients reach it) and are
compared with the `tuned/...` metrics the version was judged on. Beyond `stderr_multiple` standard errors on any
metric, the version is tagged `serving.parity=failed` with the numbers: what answers is not what was judged.

Logged on the version's run: `served/<task>/<metric>` (and `_stderr`), tags `serving.parity`,
`serving.parity.detail`, `serving.parity.key` (the same check is not run twice for one serving set-up).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from pydantic import BaseModel, ConfigDict

from loraflow.base.load import resolve_base
from loraflow.config.job import JobConfig
from loraflow.evaluation import benchmarks, heldout
from loraflow.hashing import sha_of
from loraflow.registry.client import client_for
from loraflow.results import RegisteredVersion
from loraflow.serving.names import versioned_name

log = logging.getLogger(__name__)

PARITY_TAG = "serving.parity"
DETAIL_TAG = "serving.parity.detail"
KEY_TAG = "serving.parity.key"
SERVED = "served"
TUNED = "tuned"


class MetricParity(BaseModel):
    model_config = ConfigDict(frozen=True)

    metric: str  # `<task>/<metric>`
    served: float
    registered: float
    tolerance: float

    @property
    def within(self) -> bool:
        return abs(self.served - self.registered) <= self.tolerance

    def line(self) -> str:
        mark = "ok" if self.within else "OUT"
        return (f"{self.metric}: served {self.served:.4f} vs registered {self.registered:.4f} "
                f"(|diff| {abs(self.served - self.registered):.4f}, tolerance {self.tolerance:.4f}) {mark}")


class ParityReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    served_name: str
    passed: bool
    metrics: list[MetricParity]
    limit: int | None
    seconds: float

    def detail(self) -> str:
        return "; ".join(m.line() for m in self.metrics)


def parity_key(job: JobConfig) -> str:
    """What the check depends on besides the version: how it is served and what is measured."""
    serving = job.serving.model_dump(mode="json", exclude={"port", "host", "startup_timeout_s", "max_loras"})
    return sha_of(serving, job.eval.benchmarks.model_dump(mode="json"), job.eval.heldout.model_dump(mode="json"))[:16]


def parity_verdict(job: JobConfig, model_name: str, version: str) -> str | None:
    """The version's verdict (`passed`/`failed`) under this job's serving set-up; None when not checked under it."""
    tags = client_for(job.registry).get_model_version(model_name, version).tags
    return tags.get(PARITY_TAG) if tags.get(KEY_TAG) == parity_key(job) else None


def compare(served: dict[str, float], registered: dict[str, float], stderr_multiple: float) -> list[MetricParity]:
    """Each served `<task>/<metric>` that was also registered as `tuned/...`. The tolerance is per task:
    `stderr_multiple` times the largest standard error of the task's metrics, served or registered (lm-eval gives
    none for f1; a `limit` makes the served ones the larger)."""
    task_stderr: dict[str, float] = {}
    for name, value in [*served.items(), *((k.removeprefix(f"{TUNED}/"), v) for k, v in registered.items())]:
        if name.endswith("_stderr"):
            task = name.split("/", 1)[0]
            task_stderr[task] = max(task_stderr.get(task, 0.0), value)
    compared = []
    for name, value in sorted(served.items()):
        if name.endswith("_stderr") or f"{TUNED}/{name}" not in registered:
            continue
        compared.append(MetricParity(metric=name, served=value, registered=registered[f"{TUNED}/{name}"],
                                     tolerance=stderr_multiple * task_stderr.get(name.split("/", 1)[0], 0.0)))
    return compared


def _served_heldout(client: Any, run_id: str, lm: Any, job: JobConfig, scratch: Path) -> benchmarks.BenchmarkRun:
    """The held-out task on the very rows (and label set) the version was judged on, from its run's artifacts."""
    registered = Path(client.download_artifacts(run_id, f"eval/{heldout.ROWS_FILE}", str(scratch))).parent
    client.download_artifacts(run_id, f"eval/{heldout.LABELS_FILE}", str(scratch))
    rows = [json.loads(line) for line in (registered / heldout.ROWS_FILE).read_text(encoding="utf-8").splitlines()]
    task_dir = heldout.write_task(rows, heldout.read_task_labels(registered), job.eval.heldout, scratch)
    return heldout.run_heldout(lm, job.eval.heldout, task_dir, scratch, SERVED)


def served_model_args(job: JobConfig, served_name: str, endpoint_url: str, api_key: str | None) -> dict[str, Any]:
    """lm-eval `local-completions` arguments for a served name: prompts go as token ids (the base's tokenizer), so
    the served model scores exactly the tokens the in-process evaluation scored."""
    return {
        "model": served_name,
        "base_url": f"{endpoint_url}/v1/completions",
        "tokenizer": resolve_base(job.model),
        "revision": job.model.revision or "main",
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "batch_size": job.eval.benchmarks.batch_size,
        "max_length": job.serving.max_model_len or 2048,
        "header": {"Authorization": f"Bearer {api_key}"} if api_key else None,
    }


def check_served_parity(job: JobConfig, version: RegisteredVersion, endpoint_url: str, api_key: str | None,
                        force: bool = False) -> ParityReport | None:
    """Score `<model>-v<version>` as served and tag the version. None when there is nothing to check (no
    benchmark tasks, or the check is off) or this version was checked under the same serving set-up (unless
    `force`)."""
    bench = job.eval.benchmarks
    if not job.checks_served_parity:
        return None
    client = client_for(job.registry)
    key = parity_key(job)
    if not force and (verdict := parity_verdict(job, version.model_name, version.version)) is not None:
        log.info("served parity of %s v%s: already %s", version.model_name, version.version, verdict)
        return None
    served_name = versioned_name(version.model_name, version.version)
    limit = job.serving.parity.limit
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(**served_model_args(job, served_name, endpoint_url, api_key))
    scores: dict[str, float] = {}
    seconds = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        runs = []
        if bench.tasks:
            runs.append(benchmarks.run_lm(lm, bench.model_copy(update={"limit": limit}), Path(scratch), SERVED))
        if job.eval.heldout.enabled:
            runs.append(_served_heldout(client, version.run_id, lm, job, Path(scratch)))
        for run in runs:
            for file in (run.results_file, *run.extra_files):
                client.log_artifact(version.run_id, file, "eval/served")
            scores.update(run.metrics)
            seconds += run.seconds
    now_ms = int(time.time() * 1000)  # the latest check is the one the run shows
    metrics = [Metric(f"{SERVED}/{name}", value, now_ms, 0) for name, value in scores.items()]
    client.log_batch(version.run_id, metrics=metrics)

    registered = client.get_run(version.run_id).data.metrics
    compared = compare(scores, registered, job.serving.parity.stderr_multiple)
    report = ParityReport(served_name=served_name, passed=all(m.within for m in compared) and bool(compared),
                          metrics=compared, limit=limit, seconds=seconds)
    verdict = "passed" if report.passed else "failed"
    detail = report.detail() or "no served metric matches a registered tuned/ metric"
    # Version tags show on the version's page in the MLflow UI; MLflow caps a tag value at 5000 characters.
    for tag, value in ((PARITY_TAG, verdict), (DETAIL_TAG, detail[:5000]), (KEY_TAG, key)):
        client.set_model_version_tag(version.model_name, version.version, tag, value)
    client.set_tag(version.run_id, PARITY_TAG, verdict)
    level = logging.INFO if report.passed else logging.WARNING
    log.log(level, "served parity of %s: %s in %.1f s: %s", served_name, verdict, seconds, detail)
    return report
