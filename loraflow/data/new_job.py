"""`loraflow new`: a job config written from what the data looks like (loraflow/data/shapes.py).

The job is one of the shipped twins with the user's data in it: on the embedded base (`embedded:tiny-ko`, CPU)
tiny-ko's recipe for chats and tiny-intent's for a label set (plain LoRA on fp32, all-linear); on a hub base
(`--base`) QLoRA NF4 with gradient checkpointing, as qwen-ko. A label set gets `eval.heldout` (labels) and a gate on
held-out accuracy. The text is validated as a job before it is returned, so what is written loads.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import yaml

from loraflow.config.loader import validate_config
from loraflow.config.promotion import task_gate
from loraflow.data.shapes import Inspection

SCHEMA = Path(__file__).resolve().parents[2] / "configs" / "schema.json"
EMBEDDED_BASE = "embedded:tiny-ko"
WIDTH = 118


def job_config(name: str, inspection: Inspection, base: str | None) -> dict[str, Any]:
    source = inspection.source
    origin = {"path": source.path} if source.path is not None else {"hub_id": source.hub_id}
    labels = inspection.labels is not None
    job: dict[str, Any] = {
        "name": name,
        "model": ({"base": EMBEDDED_BASE, "chat_template": "qwen2.5", "device": "cpu"} if base is None else
                  {"base": base, "revision": "main", "device": "auto", "chat_template": "qwen2.5"}),
        "data": {"sources": [{**origin, "fields": source.fields.model_dump(exclude_defaults=True)}],
                 "eval_fraction": 0.1, "seed": 42},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
    }
    if base is None:
        job["quantization"] = {"method": "none", "compute_dtype": "float32"}
        job["training"] = {"epochs": 8 if labels else 2, "learning_rate": 5.0e-3 if labels else 2.0e-3,
                           "batch_size": 8, "gradient_accumulation_steps": 1, "max_length": 2048,
                           "gradient_checkpointing": False, "logging_steps": 5, "save_steps": 50,
                           "save_total_limit": 1}
    else:
        job["quantization"] = {"method": "nf4", "double_quant": True}
        job["training"] = {"epochs": 2, "learning_rate": 2.0e-4, "batch_size": 4, "gradient_accumulation_steps": 4,
                           "max_length": 2048, "gradient_checkpointing": True, "logging_steps": 10,
                           "save_steps": 100, "save_total_limit": 2}
    if labels:
        job["eval"] = {"heldout": {"enabled": True, "kind": "labels"}}
    job["registry"] = {"model_name": name, "experiment": name}
    job["promotion"] = {"auto_champion": False}
    if labels:
        shown = {"metric", "min_gain_over_base", "min_gain_over_champion"}
        job["promotion"] |= {"max_perplexity_regression": None,
                             "require": [r.model_dump(include=shown) for r in task_gate("labels")]}
    job["serving"] = {"enabled": False}
    return job


COMMENTS = {
    "data": "What trains: `loraflow data CONFIG` shows it, rows rejected and why, and the trained tokens marked.",
    "promotion": "A passing version becomes `challenger`; a person moves `champion` (`loraflow promote`).",
    "serving": "true: the run ends serving the champion on vLLM behind the router (serving.port, default 8000).",
}


def job_yaml(name: str, spec: str, inspection: Inspection, base: str | None, output: Path) -> str:
    """The config's text: the schema line, a header (what was inferred, what to check, the launch commands), then
    the job, validated."""
    job = job_config(name, inspection, base)
    schema = os.path.relpath(SCHEMA, output.resolve().parent)
    command = f"loraflow new {name} --data {spec}" + (f" --base {base}" if base else "")
    header = [f"{name}: written by `{command}` from what the data looks like: {inspection.shape} "
              f"({inspection.rows} rows looked at)."]
    header += [f"- {line}" for line in inspection.inferred]
    if inspection.checks:
        header += ["Check before a long run:", *(f"- {line}" for line in inspection.checks)]
    if base is not None:
        header.append(f"- {base} is trained and served with Qwen2.5's chat template (model.chat_template): a "
                      "Qwen2.5 base, or a .jinja of its own with {% generation %} markers")
    lines = [f"# yaml-language-server: $schema={schema if schema.startswith('.') else './' + schema}"]
    for text in header:
        lines += textwrap.wrap(text, WIDTH, initial_indent="# ",
                               subsequent_indent="#   " if text.startswith("- ") else "# ")
    config = output.as_posix()
    lines += ["#",
              f"#   loraflow data {config} --rows 3".ljust(66) + "# what trains, trained tokens marked; no training",
              f"#   loraflow run {config}".ljust(66) + "# in this process (Prefect temporary server)",
              f"#   prefect deployment run finetune/{name}".ljust(66) + "# the local stack, after `loraflow deploy`"]
    for key, value in job.items():
        if key != "name":
            lines.append("")
        if key in COMMENTS:
            lines.append(f"# {COMMENTS[key]}")
        lines.append(yaml.safe_dump({key: value}, allow_unicode=True, sort_keys=False, width=WIDTH).rstrip())
    text = "\n".join(lines) + "\n"
    validate_config(yaml.safe_load(text), source=str(output))  # a job that does not load is never written
    return text
