"""The `finetune` flow: dataset -> chat -> train -> evaluate -> register -> promote -> merge -> deploy.

    python -m flows.finetune --config configs/tiny-ko.yaml [--set training.epochs=1 ...]
    prefect deployment run finetune/tiny-ko [--param overrides='{"training.epochs": 1}']
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml
from prefect import flow, get_run_logger

from loraflow.benchmarks import validate_tasks
from loraflow.comparison import comparison_table
from loraflow.config import ConfigError, JobConfig, load_config
from loraflow.registry import tracking_uri
from tasks.chat import format_chat
from tasks.dataset import build_dataset
from tasks.deploy import deploy
from tasks.evaluate import evaluate
from tasks.merge import merge
from tasks.promote import promote
from tasks.register import register
from tasks.train import train


@flow(name="finetune")
def finetune(config: str = "configs/tiny-ko.yaml", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fine-tune the job's base model with (Q)LoRA, evaluate base vs tuned, register and gate the adapter, then
    merge and serve it as the config says. `overrides` are dotted config fields (`{"training.learning_rate": 1e-4}`),
    validated with the config before any work starts."""
    job = validated_job(config, overrides)
    logger = get_run_logger()
    logger.info("job %s: base %s, %d data source(s)", job.name, job.model.base, len(job.data.sources))

    dataset = build_dataset(job.data)
    chat = format_chat(dataset, job.model, job.training)
    trained = train(chat, job.model, job.lora, job.quantization, job.training)
    evaluated = evaluate(chat, trained, job.model, job.quantization, job.eval)
    version = register(job, config, dataset, chat, trained, evaluated)
    decision = promote(job, version, evaluated)
    merged = merge(job, trained, version)
    served = deploy(job)

    logger.info("registered %s version %s (new: %s), alias: %s\n%s", version.model_name, version.version,
                version.created, decision.alias or "none", comparison_table(evaluated.metrics))
    return {
        "job": job.name,
        "model_name": version.model_name,
        "version": version.version,
        "new_version": version.created,
        "run_id": version.run_id,
        "tracking_uri": tracking_uri(job.registry),
        "metrics": evaluated.metrics,
        "train": trained.metrics,
        "promotion": decision.model_dump(mode="json"),
        "merged_dir": merged.merged_dir if merged else None,
        "served_routes": served.routes if served else None,
    }


def validated_job(config: str, overrides: dict[str, Any] | None) -> JobConfig:
    """Everything that can be checked before work starts: the config and the benchmark task names."""
    job = load_config(config, overrides)
    validate_tasks(job.eval.benchmarks)
    return job


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set training.epochs=1` -> {"training.epochs": 1} (values parsed as YAML)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.finetune", description=finetune.__doc__)
    parser.add_argument("--config", default="configs/tiny-ko.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    try:
        validated_job(args.config, overrides)  # fail before Prefect starts, with the field path
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    summary = finetune(config=args.config, overrides=overrides or None)
    print(f"\nregistered model {summary['model_name']!r} version {summary['version']}"
          f" ({'new' if summary['new_version'] else 'unchanged inputs: existing version reused'})")
    print(f"MLflow tracking URI: {summary['tracking_uri']}  run: {summary['run_id']}")
    promotion = summary["promotion"]
    print(f"promotion: {promotion['alias'] or 'no alias'} - " + "; ".join(promotion["reasons"]))
    print(comparison_table(summary["metrics"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
