"""`loraflow run | plan | merge | schema | check-gpu`: a job's training run and what to know before and after it."""

from __future__ import annotations

import json
import sys

from loraflow import paths
from loraflow.cli.common import DEFAULT_CONFIG, AddCommand, config_arg, parse_overrides
from loraflow.config import ConfigError, load_config


def run(config: str, overrides: list[str]) -> int:
    """The finetune flow in this process (Prefect's temporary server unless PREFECT_API_URL or a profile says
    otherwise); leaves vLLM + router running when the config serves (`loraflow down` stops them)."""
    from loraflow.localstack.temporary_server import EarlyPrefectServer

    server = EarlyPrefectServer()  # starts on another core while this one imports
    from flows.finetune import finetune, validated_job
    from loraflow.evaluation.comparison import comparison_table

    parsed = parse_overrides(overrides)
    validated_job(config, parsed)  # fail before the flow starts, with the field path
    with server.serving() as temporary_api:
        if temporary_api:
            print(f"Prefect: temporary server at {temporary_api} (it ends with this command)", file=sys.stderr)
        summary = finetune(config=config, overrides=parsed or None)
    reused = "new" if summary["new_version"] else "unchanged inputs: existing version reused"
    print(f"\nregistered model {summary['model_name']!r} version {summary['version']} ({reused})")
    print(f"MLflow tracking URI: {summary['tracking_uri']}  run: {summary['run_id']}")
    promotion = summary["promotion"]
    print(f"promotion: {promotion['alias'] or 'no alias'} - " + "; ".join(promotion["reasons"]))
    if summary["served_routes"] is not None:
        print(f"serving: {summary['served_routes']} (still running; `loraflow down` stops it)")
    print(comparison_table(summary["metrics"]))
    return 0


def plan(configs: list[str], as_json: bool, probe: bool, steps: int, rows: int | None, serving: bool) -> int:
    """Offline; --probe measures a few training steps on this machine instead (loraflow/training/probe.py);
    --serving plans what serving the jobs takes together (loraflow/serving/memory_plan.py)."""
    from loraflow.serving.memory_plan import format_serving_plan, plan_serving

    jobs = [load_config(config) for config in configs or [DEFAULT_CONFIG]]
    if serving:
        planned, text = plan_serving(jobs), format_serving_plan
    elif len(jobs) > 1:
        raise ConfigError("`loraflow plan` takes one job (several with --serving)")
    elif probe:
        from loraflow.training.probe import format_probe, probe_and_log

        planned, text = probe_and_log(jobs[0], steps, rows), format_probe
    else:
        from loraflow.training.plan import format_plan, plan_job

        planned, text = plan_job(jobs[0]), format_plan
    if as_json:
        print(json.dumps(planned.model_dump(mode="json"), indent=2))
        return 0
    print(text(planned))
    if not (serving or probe) and jobs[0].serving.enabled:
        # Its share of serving: its adapters on the server of its base, which every job of that base shares.
        print("\nserving (with every other job of its base on one server: `loraflow plan --serving CONFIG...`)\n"
              + format_serving_plan(plan_serving(jobs), totals=False))
    return 0


def merge(config: str, version: str) -> int:
    """The flow's merge step for a version the flow did not merge (a challenger a person made champion)."""
    from loraflow.training.merge import merge_version

    job = load_config(config)
    merged = merge_version(job, version, paths.sub("merge-adapters", job.registry.model_name))
    print(f"{job.registry.model_name} v{version}: merged into {merged.merged_dir} ({merged.dtype}, max |logit diff| "
          f"{merged.max_abs_logit_diff:.3g}), attached to the version's run as `merged/`")
    return 0


def schema(output: str | None) -> int:
    from loraflow.config.schema import job_schema_text

    text = job_schema_text()
    if output is None:
        sys.stdout.write(text)
    else:
        with open(output, "w", encoding="utf-8") as file:
            file.write(text)
    return 0


def check_gpu() -> int:
    from loraflow.training.device import check_bitsandbytes_cuda

    print(f"bitsandbytes NF4 quantize/dequantize on CUDA: relative error {check_bitsandbytes_cuda():.3f}: ok")
    return 0


def register(command: AddCommand) -> None:
    sub = command("run", run, "run the finetune flow for a job config", registry=True)
    config_arg(sub)
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    sub = command("plan", plan, "trainable/total parameters, adapter size and memory per mode, offline")
    sub.add_argument("configs", nargs="*", metavar="CONFIG", help=f"job YAML (default {DEFAULT_CONFIG}); several "
                     "with --serving")
    sub.add_argument("--serving", action="store_true", help="what serving the jobs takes together: one base per "
                     "server + every job's adapters + KV cache")
    sub.add_argument("--json", dest="as_json", action="store_true")
    sub.add_argument("--probe", action="store_true", help="measure a few worst-case training steps here, log to MLflow")
    sub.add_argument("--steps", type=int, default=5, help="--probe: optimizer steps to measure (default 5)")
    sub.add_argument("--rows", type=int, help="--probe: training rows to project onto (default: the built dataset)")
    sub = command("merge", merge, "merge a registered version's adapter into its base and attach it to its run",
                  registry=True)
    config_arg(sub)
    sub.add_argument("--version", required=True, help="the registered model version to merge")
    command("check-gpu", check_gpu, "bitsandbytes' CUDA library loads and NF4-quantizes on this GPU")
    sub = command("schema", schema, "print the job config's JSON Schema (every field with its description)")
    sub.add_argument("--output", default=None, metavar="FILE", help="write it here instead (configs/schema.json)")
