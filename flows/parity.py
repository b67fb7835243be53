"""The `parity` flow: served parity of a champion that a `serve` run routed, typically a person's promotion in the
MLflow UI (the finetune flow checks the versions it serves itself). A `serve` pass that points the stable name at a
version not checked yet emits `loraflow.champion.routed`; the trigger on `parity/<job>` (deployments/prefect.yaml)
starts this flow with that version. Its own deployment, not a step of `serve`: scoring takes minutes, and the
`serve/<job>` runs (one at a time) must stay free for the next alias move.

    prefect deployment run parity/tiny-ko --param version=3     # by hand, for a champion never checked
"""

from __future__ import annotations

from typing import Any

from loraflow.env import configure_environment

configure_environment()  # first: a worker's flow run loads this file by path (flows/__init__.py)

from prefect import flow

from loraflow.config import load_config
from tasks.served_parity import promoted_version, served_parity


@flow(name="parity")
def parity(version: str, config: str = "configs/tiny-ko.yaml",
           overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score `<model>-v<version>` through the router and tag the version `serving.parity`, unless the stable name
    answers with another version by now (the champion moved on) or it was checked under this serving set-up."""
    job = load_config(config, {**(overrides or {}), "serving.enabled": True})
    registered = promoted_version(job, version)
    report = served_parity(job, registered, as_champion=True)
    return {"job": job.name, "model_name": registered.model_name, "version": registered.version,
            "run_id": registered.run_id, "served_parity": report.model_dump(mode="json") if report else None}
