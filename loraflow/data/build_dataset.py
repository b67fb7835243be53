"""build_dataset: sources -> validated, deduplicated chat `messages` with a deterministic train/eval split.

Local files (jsonl/json/csv/parquet) and hub datasets go through the same normalisation and validation.
Rejected rows are written with the source, row number and reason; good rows always survive bad neighbours.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from loraflow.config.data import DataConfig, DataSource, FieldMapping
from loraflow.hashing import sha_of
from loraflow.outputs import write_json
from loraflow.results import DatasetResult

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


class DatasetError(ValueError):
    """No usable data, or a source that cannot be read at all."""


def _file_format(source: DataSource) -> str:
    if source.format != "auto":
        return source.format
    suffix = Path(source.path or "").suffix.lower().lstrip(".")
    formats = {"jsonl": "jsonl", "json": "json", "csv": "csv", "parquet": "parquet"}
    if suffix not in formats:
        raise DatasetError(f"data.sources: cannot tell the format of {source.path}; set `format`")
    return formats[suffix]


def read_rows(source: DataSource) -> Iterator[tuple[int, Any]]:
    """(row number, raw row). JSON lines are parsed one by one so that a broken line is a rejected row, not a
    crashed load; other formats go through `datasets.load_dataset` (the same call as hub datasets)."""
    if source.path is not None and _file_format(source) == "jsonl":
        with open(source.path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    yield number, ValueError(f"invalid JSON: {error.msg}")
        return
    if source.path is not None:
        fmt = _file_format(source)
        loaded = load_dataset(fmt, data_files=source.path, split="train")
    else:
        loaded = load_dataset(source.hub_id, name=source.subset, revision=source.revision, split=source.split)
    yield from enumerate(loaded, start=1)


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
    missing = [name for name in (fields.prompt, fields.response) if name not in raw]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    messages = []
    if fields.system is not None and raw.get(fields.system):
        messages.append({"role": "system", "content": raw[fields.system]})
    messages += [
        {"role": "user", "content": raw[fields.prompt]},
        {"role": "assistant", "content": raw[fields.response]},
    ]
    return messages


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


def build_dataset(data: DataConfig, out_dir: Path, key: str) -> DatasetResult:
    rows: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    seen: set[str] = set()
    per_source: dict[str, Counter] = {}
    for source in data.sources:
        counts: Counter = Counter()
        per_source[source.label] = counts
        for number, raw in read_rows(source):
            if source.limit is not None and counts["read"] >= source.limit:
                break
            counts["read"] += 1
            try:
                if isinstance(raw, Exception):
                    raise raw
                messages = to_messages(raw, source.fields)
                reason = validate_messages(messages, data.max_chars_per_turn)
            except ValueError as error:
                reason = str(error)
            if reason is None:
                messages = _with_system(messages, data.system_prompt)
                canonical = json.dumps(messages, ensure_ascii=False, sort_keys=True)
                if data.dedupe and canonical in seen:
                    reason = "exact duplicate of an earlier row"
                else:
                    seen.add(canonical)
                    rows.append({"messages": messages, "_canonical": canonical})
                    counts["kept"] += 1
                    continue
            counts["rejected"] += 1
            rejected.append({"source": source.label, "row": number, "reason": reason,
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
        "train": Dataset.from_list([{"messages": r["messages"]} for r in train_rows]),
        "eval": Dataset.from_list([{"messages": r["messages"]} for r in eval_rows]),
    })
    splits.save_to_disk(str(out_dir / "dataset"))
    with (out_dir / "rejected.jsonl").open("w", encoding="utf-8") as fh:
        for item in rejected:
            fh.write(json.dumps(item, ensure_ascii=False, default=str) + "\n")
    stats = {
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "rejected_rows": len(rejected),
        "rejection_reasons": dict(Counter(_reason_kind(r["reason"]) for r in rejected)),
        "sources": {label: dict(c) for label, c in per_source.items()},
    }
    write_json(out_dir / "stats.json", stats)
    dataset_sha = sha_of([r["_canonical"] for r in train_rows], [r["_canonical"] for r in eval_rows])
    log.info("dataset: %d train, %d eval, %d rejected (see %s)", len(train_rows), len(eval_rows),
             len(rejected), out_dir / "rejected.jsonl")
    return DatasetResult(key=key, path=str(out_dir), dataset_sha=dataset_sha, stats=stats)


def _reason_kind(reason: str) -> str:
    """Group reasons for the summary ('turn 2: empty assistant turn' -> 'empty assistant turn')."""
    return reason.split(": ", 1)[1] if reason.startswith("turn ") else reason
