"""The `serve` flow, the serving reconciler: vLLM serves exactly the registry's aliased versions, each under
its immutable name (`tiny-ko-v3`), with the stable name (`tiny-ko`) following `champion` (docs/serving.md).
A pass that routes a champion not parity-checked yet announces it; `parity/<job>` checks it (flows/parity.py).

    loraflow serve configs/tiny-ko.yaml          # one pass now; starts vLLM + router if not running
    prefect deployment run serve/tiny-ko         # the same pass through the local stack
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow

from loraflow.config import load_config
from tasks.deploy import deploy
from tasks.served_parity import announce_champion


@flow(name="serve")
def serve(config: str = "configs/tiny-ko.yaml", overrides: dict[str, Any] | None = None, start: bool = True,
          promoted_at: datetime | None = None) -> dict[str, Any]:
    """One reconcile pass. `start=False` (the deployment's default) reconciles running servers and restarts crashed
    ones, but never starts serving from nothing: a finetune run or `loraflow serve` does.
    `promoted_at` is set by the alias-event trigger (deployments/prefect.yaml): the time of the alias move."""
    job = load_config(config, {**(overrides or {}), "serving.enabled": True})
    report = deploy(job, start=start, promoted_at=promoted_at)
    announced = announce_champion(job, report)
    return {**report.model_dump(), "parity_requested_for": announced} if report else {"serving": "off"}
