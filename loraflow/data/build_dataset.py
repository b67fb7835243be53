"""build_dataset: sources -> validated, deduplicated chat `messages` with a deterministic train/eval split.

Local sources (a jsonl/json/csv/parquet file, a directory of them, or a glob) and hub datasets are read by one
path (loraflow/data/load.py) and each row becomes a conversation through one seam (loraflow/data/conversation.py:
`to_conversation`, a raw row + the source's field mapping -> a conversation or the reason it is rejected). What is
read is what the step's key hashed: the run's `PinnedData` (pinned once at flow start, loraflow/data/sources.py), a
local source's manifest of files, a hub dataset at its pinned commit.
Rejected rows are written with the source, file, row number and reason; good rows always survive bad neighbours.
stats.json records rows read and kept per source, rejections per reason (duplicates among them) and the manifest
(each file's path, sha and rows) that a later run diffs against the champion's; loraflow/data/summary.py words it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from loraflow.config.data import DataConfig, DataSource, FieldMapping, template_columns
from loraflow.data.conversation import Conversation, RowError, to_conversation
from loraflow.data.load import DatasetError, read_rows
from loraflow.data.preference import to_pair
from loraflow.data.sources import PinnedData, SourceFingerprint, as_pinned, dataset_manifest
from loraflow.hashing import sha_of
from loraflow.outputs import write_json
from loraflow.results import DatasetResult

MANIFEST_FILE = "manifest.json"
DUPLICATE = "exact duplicate of an earlier row"
__all__ = ["DUPLICATE", "MANIFEST_FILE", "DatasetError", "build_dataset"]


def check_columns(fields: FieldMapping, row: dict[str, Any], where: str, file: str) -> None:
    """A template that names a column the file does not have fails the step at once (not row by row)."""
    for name in ("prompt_template", "response_template"):
        template = getattr(fields, name)
        for column in template_columns(template) if template else []:
            if column not in row:
                raise DatasetError(f"{where}.fields.{name} names column {column!r}, which {file} does not have "
                                   f"(columns: {', '.join(row)})")


def _with_system(conversation: Conversation, system_prompt: str | None) -> Conversation:
    if system_prompt and conversation.messages[0]["role"] != "system":
        system = {"role": "system", "content": system_prompt, "tool_calls": None}
        return Conversation(messages=[system, *conversation.messages], tools=conversation.tools)
    return conversation


def _split_score(canonical: str, seed: int) -> float:
    return int(sha_of(seed, canonical)[:12], 16) / float(16**12)


def build_dataset(data: DataConfig | PinnedData, out_dir: Path, key: str) -> DatasetResult:
    # The pinned fingerprints are read, never recomputed: the files and commits recorded are exactly those keyed.
    pinned = as_pinned(data)
    data, fingerprints = pinned.data, pinned.fingerprints
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    seen: set[str] = set()
    per_source: dict[str, Counter] = {}
    per_file: Counter = Counter()
    labels: dict[str, list[str]] = {}
    for index, (source, fingerprint) in enumerate(zip(data.sources, fingerprints, strict=True)):
        counts: Counter = Counter()
        per_source[source.label] = counts
        if source.fields.label_names is not None:
            labels[source.fields.label_column] = list(source.fields.label_names)
        checked: set[str] = set()
        for file, number, raw in read_rows(source, fingerprint, labels):
            if source.limit is not None and counts["read"] >= source.limit:
                break
            counts["read"] += 1
            per_file[(index, file)] += 1
            if file not in checked and isinstance(raw, dict):
                check_columns(source.fields, raw, f"data.sources[{index}]", _file_label(source, fingerprint, file))
                checked.add(file)
            try:
                if isinstance(raw, Exception):
                    raise RowError(str(raw))
                # One seam per row: a conversation (loraflow/data/conversation.py) or a preference pair
                # (loraflow/data/preference.py), each with the record the dataset stores and its canonical text.
                kept = (to_pair(raw, source.fields, data) if source.fields.is_pair else
                        _with_system(to_conversation(raw, source.fields, data.max_chars_per_turn), data.system_prompt))
            except ValueError as error:  # RowError among them
                reason = str(error)
            else:
                canonical = kept.canonical
                if not data.dedupe or canonical not in seen:
                    seen.add(canonical)
                    rows.append({"conversation": kept, "_canonical": canonical})
                    counts["kept"] += 1
                    continue
                reason = DUPLICATE
            counts["rejected"] += 1
            rejected.append({"source": source.label, "file": file, "row": number, "reason": reason,
                             "data": raw if not isinstance(raw, Exception) else None,
                             "_where": f"{_file_label(source, fingerprint, file)} row {number}"})
        if not counts["read"]:
            files = [_file_label(source, fingerprint, entry.path) for entry in fingerprint.files]
            raise DatasetError(f"data.sources[{index}]: no rows in {', '.join(files)}")
    if not rows:
        raise DatasetError(f"data.sources: no usable rows in {[s.label for s in data.sources]}; "
                           + _most_common(rejected))

    for row in rows:
        row["_score"] = _split_score(row["_canonical"], data.seed)
    ordered = sorted(rows, key=lambda r: r["_score"])
    eval_rows = [r for r in ordered if r["_score"] < data.eval_fraction] or ordered[:1]
    if data.eval_max_rows is not None:
        eval_rows = eval_rows[: data.eval_max_rows]
    eval_ids = {id(r) for r in eval_rows}
    train_rows = [r for r in ordered if id(r) not in eval_ids]
    if not train_rows:
        raise DatasetError("data: every usable row landed in the eval split; add data or lower eval_fraction")

    splits = DatasetDict({
        "train": Dataset.from_list([r["conversation"].record for r in train_rows]),
        "eval": Dataset.from_list([r["conversation"].record for r in eval_rows]),
    })
    splits.save_to_disk(str(out_dir / "dataset"))
    with (out_dir / "rejected.jsonl").open("w", encoding="utf-8") as fh:
        for item in rejected:
            item.pop("_where")
            fh.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")
    manifest = dataset_manifest(fingerprints, dict(per_file))
    kept = [r["conversation"] for r in rows]
    stats = {
        "rows_read": sum(c["read"] for c in per_source.values()),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "rejected_rows": len(rejected),  # duplicates included
        "duplicates": sum(r["reason"] == DUPLICATE for r in rejected),
        "rejection_reasons": dict(Counter(_reason_kind(r["reason"]) for r in rejected).most_common()),
        "sources": {label: dict(c) for label, c in per_source.items()},
        "labels": labels,  # label column -> names (ClassLabel or label_names): the label set of this version
        # The last assistant turn's text: a few distinct answers over many rows is a label set (summary.py's hint).
        "distinct_answers": len({c.messages[-1]["content"] for c in kept}),
        "rows_with_tools": sum(bool(c.tools or any(m.get("tool_calls") for m in c.messages)) for c in kept),
        "manifest": manifest,
    }
    write_json(out_dir / "stats.json", stats)
    write_json(out_dir / MANIFEST_FILE, manifest)
    dataset_sha = sha_of([r["_canonical"] for r in train_rows], [r["_canonical"] for r in eval_rows])
    return DatasetResult(key=key, path=str(out_dir), dataset_sha=dataset_sha, stats=stats)


def _file_label(source: DataSource, fingerprint: SourceFingerprint, file: str) -> str:
    """A file as the user wrote it (data/x.csv), or the hub dataset and split."""
    if fingerprint.kind == "hub":
        return f"{source.label} split {file}"
    path = Path(fingerprint.root or ".").resolve() / file
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _most_common(rejected: list[dict[str, Any]]) -> str:
    """The most common rejections, each with the first file and row that had it."""
    first: dict[str, dict[str, Any]] = {}
    for item in rejected:
        first.setdefault(_reason_kind(item["reason"]), item)
    counts = Counter(_reason_kind(r["reason"]) for r in rejected).most_common(3)
    return "most common rejections: " + "; ".join(
        f"{reason} ({count} row(s); first: {first[reason]['_where']}: {first[reason]['reason']})"
        for reason, count in counts)


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary ('turn 2: empty assistant turn' -> 'empty assistant turn')."""
    return reason.split(": ", 1)[1] if reason.startswith("turn ") else reason
