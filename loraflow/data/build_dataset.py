"""build_dataset: sources -> validated, deduplicated chat `messages` with a deterministic train/eval split.

Local sources (a jsonl/json/csv/parquet file, a directory of them, or a glob) and hub datasets go through the same
normalisation and validation. What is read is what the step's key hashed: the run's `PinnedData` (pinned once at
flow start, loraflow/data/sources.py), a local source's manifest of files, a hub dataset at its pinned commit.
Rejected rows are written with the source, file, row number and reason; good rows always survive bad neighbours.
stats.json records rows per source and the manifest (each file's path, sha and rows) that a later run diffs
against the champion's.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset

from loraflow.config.data import DataConfig, DataSource, FieldMapping, template_columns
from loraflow.data.preference import pair_record
from loraflow.data.sources import PinnedData, SourceFingerprint, as_pinned, dataset_manifest, file_format
from loraflow.hashing import sha_of
from loraflow.hub import cached_snapshot
from loraflow.outputs import write_json
from loraflow.results import DatasetResult

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]
MANIFEST_FILE = "manifest.json"


class DatasetError(ValueError):
    """No usable data, or a source that cannot be read at all."""


def _hub_offline() -> bool:
    import datasets.config
    from huggingface_hub import constants

    return constants.is_offline_mode() or bool(datasets.config.HF_HUB_OFFLINE)


def load_hub(source: DataSource, revision: str) -> Dataset:
    """A hub dataset at a resolved commit sha.

    Offline (or when the Hub cannot be reached) the commit's snapshot in the hub cache is read as a local dataset
    directory, with the same README `configs:` and split patterns. Why not `load_dataset(hub_id, revision=sha)`
    offline: datasets 5.2 then skips the hub cache and falls back to "the latest cached version" of its own cache,
    whatever the revision, which would train on other data than the key and the lineage name.
    """
    assert source.hub_id is not None
    if not _hub_offline():
        try:
            return load_dataset(source.hub_id, name=source.subset, revision=revision, split=source.split)
        except ConnectionError as error:
            log.warning("dataset %s: the Hub cannot be reached (%s); reading commit %s from the hub cache",
                        source.hub_id, error, revision)
    snapshot = cached_snapshot(source.hub_id, revision, "dataset")
    if snapshot is None:
        raise DatasetError(f"data.sources: {source.hub_id} at commit {revision} is not in the hub cache and the Hub "
                           f"is offline; run once online or `hf download {source.hub_id} --repo-type dataset "
                           f"--revision {revision}`")
    return load_dataset(str(snapshot), name=source.subset, split=source.split)


def _named_rows(loaded: Dataset, labels: dict[str, list[str]]) -> Iterator[dict[str, Any]]:
    """The rows with each `ClassLabel` column's ids replaced by its names (Banking77's `label`: 11 ->
    `card_arrival`): a model trained on the ids would answer `11`. The names go into `labels`."""
    names = {column: feature.names for column, feature in loaded.features.items() if isinstance(feature, ClassLabel)}
    labels.update(names)
    for row in loaded:
        yield {**row, **{column: names[column][row[column]] for column in names if row[column] is not None}}


def read_rows(source: DataSource, fingerprint: SourceFingerprint,
              labels: dict[str, list[str]] | None = None) -> Iterator[tuple[str, int, Any]]:
    """(file, row number, raw row) of the files the fingerprint names, in its (sorted) order; for a hub source the
    "file" is the split. JSON lines are parsed one by one so that a broken line is a rejected row, not a crashed
    load; other formats go through `datasets.load_dataset` (the same call as hub datasets), with `ClassLabel`
    columns as names (recorded in `labels`)."""
    labels = {} if labels is None else labels
    if fingerprint.kind == "hub":
        assert fingerprint.revision is not None
        split = fingerprint.files[0].path
        for number, row in enumerate(_named_rows(load_hub(source, fingerprint.revision), labels), start=1):
            yield split, number, row
        return
    root = Path(fingerprint.root or ".")
    for entry in fingerprint.files:
        file = root / entry.path
        fmt = file_format(source, file)
        if fmt == "jsonl":
            with file.open(encoding="utf-8") as fh:
                for number, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield entry.path, number, json.loads(line)
                    except json.JSONDecodeError as error:
                        yield entry.path, number, ValueError(f"invalid JSON: {error.msg}")
            continue
        # Each file with its own builder: a directory may mix formats whose columns datasets cannot merge.
        loaded = load_dataset(fmt, data_files=str(file), split="train")
        for number, row in enumerate(_named_rows(loaded, labels), start=1):
            yield entry.path, number, row


def to_messages(raw: Any, fields: FieldMapping) -> Any:
    """Map a raw row to a messages list (not yet validated)."""
    if not isinstance(raw, dict):
        raise ValueError(f"row is a {type(raw).__name__}, not an object")
    if fields.messages is not None:
        if fields.messages not in raw:
            raise ValueError(f"missing field {fields.messages!r}")
        turns = raw[fields.messages]
        if not isinstance(turns, list):
            raise ValueError(f"field {fields.messages!r} is not a list of turns")
        out = []
        for turn in turns:
            if not isinstance(turn, dict):
                raise ValueError("a turn is not an object")
            out.append({"role": turn.get(fields.role_key), "content": turn.get(fields.content_key)})
        return out
    missing = [name for name in fields.columns() if name not in raw]
    if missing:
        raise ValueError(f"missing field(s) {missing}; the row's columns are {sorted(raw)}")
    row = _with_label_names(raw, fields)
    messages = []
    if fields.system is not None and raw.get(fields.system):
        messages.append({"role": "system", "content": raw[fields.system]})
    messages += [
        {"role": "user", "content": _side(row, fields.prompt, fields.prompt_template)},
        {"role": "assistant", "content": _side(row, fields.response, fields.response_template)},
    ]
    return messages


def _with_label_names(raw: dict[str, Any], fields: FieldMapping) -> dict[str, Any]:
    """`label_names` applied to the row's `label_column` id (local files; hub ClassLabels are already names)."""
    names, column = fields.label_names, fields.label_column
    if names is None or isinstance(raw.get(column), str):
        return raw
    value = raw.get(column)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(names):
        raise ValueError(f"{column} {value!r} is not an id of label_names (0..{len(names) - 1})")
    return {**raw, column: names[value]}


def _side(row: dict[str, Any], column: str | None, template: str | None) -> Any:
    return template.format(**row) if template is not None else row[column]


def check_columns(fields: FieldMapping, row: dict[str, Any], where: str, file: str) -> None:
    """A template that names a column the file does not have fails the step at once (not row by row)."""
    for name in ("prompt_template", "response_template"):
        template = getattr(fields, name)
        for column in template_columns(template) if template else []:
            if column not in row:
                raise DatasetError(f"{where}.fields.{name} names column {column!r}, which {file} does not have "
                                   f"(columns: {', '.join(row)})")


def validate_messages(messages: Messages, max_chars: int) -> str | None:
    """The reason a conversation is unusable, or None. Shape: [system] user assistant (user assistant)*."""
    if not messages:
        return "no turns"
    for index, turn in enumerate(messages):
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            return f"turn {index}: unknown role {role!r}"
        if not isinstance(content, str):
            return f"turn {index}: content is not text"
        if not content.strip():
            return f"turn {index}: empty {role} turn"
        if len(content) > max_chars:
            return f"turn {index}: {len(content)} chars > max_chars_per_turn {max_chars}"
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for index, turn in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn["role"] != expected:
            return f"turns must alternate user/assistant after an optional system turn; found {turn['role']!r}"
    if not body or body[-1]["role"] != "assistant":
        return "conversation does not end with an assistant turn"
    return None


def _with_system(messages: Messages, system_prompt: str | None) -> Messages:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


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
        pair = source.fields.is_pair  # preference pairs, mapped and checked by loraflow/data/preference.py
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
                    raise raw
                messages = pair_record(raw, source.fields, data) if pair else to_messages(raw, source.fields)
                reason = None if pair else validate_messages(messages, data.max_chars_per_turn)
            except ValueError as error:
                reason = str(error)
            if reason is None:
                record = messages if pair else {"messages": _with_system(messages, data.system_prompt)}
                canonical = json.dumps(record.get("messages", record), ensure_ascii=False, sort_keys=True)
                if data.dedupe and canonical in seen:
                    reason = "exact duplicate of an earlier row"
                else:
                    seen.add(canonical)
                    rows.append({"record": record, "_canonical": canonical})
                    counts["kept"] += 1
                    continue
            counts["rejected"] += 1
            rejected.append({"source": source.label, "file": file, "row": number, "reason": reason,
                             "data": raw if not isinstance(raw, Exception) else None})
    if not rows:
        reasons = Counter(r["reason"] for r in rejected).most_common(3)
        raise DatasetError(f"data.sources: no usable rows in {[s.label for s in data.sources]}; "
                           f"most common rejections: {reasons}")

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
        "train": Dataset.from_list([r["record"] for r in train_rows]),
        "eval": Dataset.from_list([r["record"] for r in eval_rows]),
    })
    splits.save_to_disk(str(out_dir / "dataset"))
    with (out_dir / "rejected.jsonl").open("w", encoding="utf-8") as fh:
        for item in rejected:
            fh.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")
    manifest = dataset_manifest(fingerprints, dict(per_file))
    stats = {
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "rejected_rows": len(rejected),
        "rejection_reasons": dict(Counter(_reason_kind(r["reason"]) for r in rejected)),
        "sources": {label: dict(c) for label, c in per_source.items()},
        "labels": labels,  # label column -> names (ClassLabel or label_names): the label set of this version
        "manifest": manifest,
    }
    write_json(out_dir / "stats.json", stats)
    write_json(out_dir / MANIFEST_FILE, manifest)
    dataset_sha = sha_of([r["_canonical"] for r in train_rows], [r["_canonical"] for r in eval_rows])
    log.info("dataset: %d train, %d eval, %d rejected (see %s)", len(train_rows), len(eval_rows),
             len(rejected), out_dir / "rejected.jsonl")
    return DatasetResult(key=key, path=str(out_dir), dataset_sha=dataset_sha, stats=stats)


def _file_label(source: DataSource, fingerprint: SourceFingerprint, file: str) -> str:
    """A file as the user wrote it (data/x.csv), or the hub dataset and split."""
    if fingerprint.kind == "hub":
        return f"{source.label} split {file}"
    path = Path(fingerprint.root or ".").resolve() / file
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary ('turn 2: empty assistant turn' -> 'empty assistant turn')."""
    return reason.split(": ", 1)[1] if reason.startswith("turn ") else reason
