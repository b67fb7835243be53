"""The `serve` flow, the serving reconciler: vLLM serves exactly the registry's aliased versions, each under
its immutable name (`tiny-ko-v3`), with the stable name (`tiny-ko`) following `champion` (docs/serving.md).

    loraflow serve configs/tiny-ko.yaml          # one pass now; starts vLLM + router if not running
    prefect deployment run serve/tiny-ko         # the same pass through the local stack
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import flow

from loraflow.config import load_config
from tasks.deploy import deploy


@flow(name="serve")
def serve(config: str = "configs/tiny-ko.yaml", overrides: dict[str, Any] | None = None, start: bool = True,
          promoted_at: datetime | None = None) -> dict[str, Any]:
    """One reconcile pass. `start=False` (the deployment's default) reconciles running servers and restarts crashed
    ones, but never starts serving from nothing: a finetune run or `loraflow serve` does.
    `promoted_at` is set by the alias-event trigger (deployments/prefect.yaml): the time of the alias move."""
    job = load_config(config, {**(overrides or {}), "serving.enabled": True})
    report = deploy(job, start=start, promoted_at=promoted_at)
    return report.model_dump() if report else {"serving": "off"}
