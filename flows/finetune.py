"""The `finetune` flow: dataset -> chat -> train -> evaluate -> register -> promote -> merge -> deploy ->
served parity. `training.method` (sft, dpo) changes what the steps' plain functions do, not the DAG.

    loraflow run configs/tiny-ko.yaml [--set training.epochs=1 ...]
    prefect deployment run finetune/tiny-ko [--param overrides='{"training.epochs": 1}']

Each step is one task in tasks/<step>.py wrapping one plain function in loraflow/<stage>/<step>.py
(docs/architecture.md has the map).
"""

from __future__ import annotations

from typing import Any

from loraflow.env import configure_environment

configure_environment()  # first: a worker's flow run loads this file by path (flows/__init__.py)

from prefect import flow, get_run_logger

from tasks.build_dataset import build_dataset
from tasks.deploy import deploy
from tasks.evaluate import evaluate
from tasks.format_chat import format_chat
from tasks.merge import merge
from tasks.promote import promote
from tasks.register import register
from tasks.served_parity import served_parity
from tasks.train import train
from tasks.validate import validated_job


@flow(name="finetune")
def finetune(config: str = "configs/tiny-ko.yaml", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune the job's base model with (Q)LoRA (SFT, or DPO from a registered version), evaluate base (and the
    starting point) vs tuned, register and gate the adapter, then merge and serve it as the config says, and check
    that the served version scores what was judged. `overrides` are dotted config fields
    (`{"training.learning_rate": 1e-4}`), validated with the config before any work."""
    job, data, parent = validated_job(config, overrides)  # every moving reference pinned once, here
    get_run_logger().info("job %s: %s on base %s, %d data source(s)%s", job.name, job.training.method, job.model.base,
                          len(job.data.sources), f", from {parent.name} ({parent.requested})" if parent else "")

    dataset = build_dataset(data)
    chat = format_chat(dataset, job.model, job.training)
    trained = train(chat, job.model, job.lora, job.quantization, job.training, job.registry, job.name, parent)
    evaluated = evaluate(chat, trained, job.model, job.quantization, job.eval, parent)
    version = register(job, config, dataset, chat, trained, evaluated, parent)
    decision = promote(job, version, evaluated)
    merged = merge(job, trained, version, decision)  # only a version this decision made champion
    served = deploy(job, config, overrides)
    parity = served_parity(job, version)  # as it answers after deploy; not checked when nothing serves it

    return {
        "job": job.name,
        "model_name": version.model_name,
        "version": version.version,
        "parent_version": parent.name if parent else None,
        "new_version": version.created,
        "run_id": version.run_id,
        "tracking_uri": version.tracking_uri,
        "metrics": evaluated.metrics,
        "train": trained.metrics,
        "promotion": decision.model_dump(mode="json"),
        "merged_dir": merged.merged_dir if merged else None,
        "served_routes": served.routes if served else None,
        "served_parity": parity.model_dump(mode="json") if parity else None,
    }
