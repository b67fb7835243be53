"""The `serve` flow, one pass of a job's serving reconciler: its aliased versions on the vLLM of its base, each
under its immutable name (`tiny-ko-v3`), with the stable name (`tiny-ko`) following `champion` on the stack's one
endpoint (docs/serving.md). A pass that routes a champion not parity-checked yet announces it; `parity/<job>`
checks it (flows/parity.py).

    loraflow serve configs/tiny-ko.yaml          # one pass now; starts the endpoint and the base's vLLM if needed
    loraflow serve --follow                      # the stack's reconciler: a pass per alias move, in seconds
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from loraflow.config import load_config
from tasks.deploy import deploy
from tasks.served_parity import announce_champion


def _run_name() -> str:
    """`tiny-ko: alias moved`, so the Prefect UI's list of serve runs says which job each pass was for."""
    parameters = flow_run.parameters
    return f"{Path(str(parameters.get('config', ''))).stem}: {parameters.get('reason') or 'serve'}"


@flow(name="serve", flow_run_name=_run_name)
def serve(config: str = "configs/tiny-ko.yaml", overrides: dict[str, Any] | None = None, start: bool = True,
          promoted_at: datetime | None = None, reason: str | None = None) -> dict[str, Any]:
    """One reconcile pass. `start=False` (the stack's reconciler) never starts serving from nothing: it serves the
    job while the stack's endpoint runs, and heals a crashed endpoint. `promoted_at`: the time of the alias move
    that started the pass. `reason`: why the pass runs (shown in the run's name)."""
    job = load_config(config, {**(overrides or {}), "serving.enabled": True})
    report = deploy(job, config, overrides, start=start, promoted_at=promoted_at)
    announced = announce_champion(job, report)
    return {**report.model_dump(), "parity_requested_for": announced} if report else {"serving": "off"}
