"""`loraflow new | data`: a job from the data as people have it, and what it will train before it trains."""

from __future__ import annotations

from pathlib import Path

from loraflow.cli.common import AddCommand, config_arg, parse_overrides
from loraflow.config import load_config
from loraflow.errors import InputError
from loraflow.hub import RevisionError


def new(name: str, data: str, base: str | None, output: str | None, force: bool) -> int:
    """Inspect the data (a file, directory, glob or hub dataset id), recognise its shape and write a job config
    that validates; says what it inferred and what to check."""
    from loraflow.data.load import DatasetError
    from loraflow.data.new_job import job_yaml
    from loraflow.data.shapes import inspect_data

    target = Path(output or f"configs/{name}.yaml")
    if target.exists() and not force:
        raise InputError(f"{target} exists; --force overwrites it, --output writes another file")
    try:
        inspection = inspect_data(data)
    except (DatasetError, FileNotFoundError, RevisionError) as error:
        raise InputError(str(error)) from None
    text = job_yaml(name, data, inspection, base, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    print(f"{data}: {inspection.shape}, {inspection.rows} rows looked at")
    for column, kind in inspection.columns.items():
        print(f"  column {column}: {kind}")
    if inspection.labels is not None:
        print("  labels: " + ", ".join(f"{label} ({count})" for label, count in inspection.labels.most_common()))
    print("inferred:")
    for line in inspection.inferred:
        print(f"  - {line}")
    if inspection.checks:
        print("check:")
        for line in inspection.checks:
            print(f"  - {line}")
    print(f"wrote {target}; next: loraflow data {target.as_posix()} --rows 3, then loraflow run {target.as_posix()}")
    return 0


def data(config: str, rows: int, overrides: list[str]) -> int:
    """The data steps (cached like the flow's), their summary and warnings, and `rows` rendered training rows with
    the trained tokens between ⟦ and ⟧. No training."""
    from loraflow.data.load import DatasetError
    from loraflow.data.preview import build_and_format, rendered_rows
    from loraflow.data.summary import (
        chat_summary,
        chat_warnings,
        dataset_summary,
        dataset_warnings,
        heldout_hint,
    )

    job = load_config(config, parse_overrides(overrides))
    try:
        dataset, chat = build_and_format(job)
    except (DatasetError, FileNotFoundError, RevisionError) as error:
        raise InputError(str(error)) from None
    print("\n".join([*dataset_summary(dataset.stats, dataset.path), *chat_summary(chat.stats)]))
    hint = heldout_hint(dataset.stats, job.eval.heldout)
    for warning in [*dataset_warnings(dataset.stats, dataset.path), *chat_warnings(chat.stats)]:
        print(f"warning: {warning}")
    if hint:
        print(f"hint: {hint}")
    for number, text in enumerate(rendered_rows(chat, job, rows), start=1):
        print(f"\n--- train row {number} of {chat.stats['train_rows']} (trained tokens between ⟦ and ⟧) ---\n{text}")
    return 0


def register(command: AddCommand) -> None:
    sub = command("new", new, "write configs/NAME.yaml from a data file or hub dataset (shape, field mapping, gate)")
    sub.add_argument("name", help="the job's name (lowercase letters, digits, ., _, -)")
    sub.add_argument("--data", required=True, metavar="PATH|HUB_ID",
                     help="a jsonl/json/csv/parquet file, a directory or glob of them, or a hub dataset id")
    sub.add_argument("--base", default=None, metavar="HUB_ID",
                     help="the base model (default: the embedded tiny-ko on CPU)")
    sub.add_argument("--output", default=None, metavar="FILE", help="where to write it (default configs/NAME.yaml)")
    sub.add_argument("--force", action="store_true", help="overwrite an existing file")
    sub = command("data", data, "build and tokenize a job's data (no training): summary, warnings, rows with the "
                  "trained tokens marked")
    config_arg(sub)
    sub.add_argument("--rows", type=int, default=2, help="training rows to render (default 2)")
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
