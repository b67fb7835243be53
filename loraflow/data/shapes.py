"""What a data file or hub dataset looks like (columns, the shape of their values, value counts) and which of the
common shapes it is, with the field mapping that reads it: `loraflow new` writes a job from it.

The data is read through the data step's own path (loraflow/data/load.py `read_rows`, a hub id at the commit its
branch resolves to, offline from the hub cache), so what is inspected is what will train.

Shapes, in the order they are tried: turns in a list column (OpenAI/chat `messages`, with tool calls or a `tools`
column; ShareGPT `conversations` of {from, value}), alpaca (`instruction`, `input`, `output`), a prompt/response
pair of columns, and a text column with a label column of few distinct values (a label set).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from loraflow.config.data import DEFAULT_ROLES, DataSource, FieldMapping
from loraflow.data.load import DatasetError, read_rows
from loraflow.data.sources import FORMATS, GLOB_CHARS, source_fingerprint
from loraflow.data.summary import LABEL_SET_MAX, ROWS_PER_LABEL

SAMPLE_ROWS = 5000
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# Role names other exports use, beyond loraflow's defaults (Gemini's `model`, OpenAssistant's `prompter`, ...).
ROLE_GUESSES = {"model": "assistant", "bot": "assistant", "ai": "assistant", "chatgpt": "assistant",
                "bard": "assistant", "prompter": "user", "function": "tool", "ipython": "tool"}
PAIRS = (("instruction", "output"), ("prompt", "response"), ("prompt", "completion"), ("question", "answer"),
         ("query", "response"), ("instruction", "response"), ("question", "response"), ("input", "output"))
TEXT_COLUMNS = ("text", "sentence", "content", "utterance", "query", "question", "review", "document", "input")
LABEL_COLUMNS = ("label", "labels", "intent", "category", "class", "target", "sentiment")


@dataclass
class Inspection:
    source: DataSource  # the path or hub id with the field mapping chosen
    shape: str
    rows: int  # rows looked at (at most SAMPLE_ROWS)
    columns: dict[str, str]  # column -> what its values are
    labels: Counter | None = None  # a label set's value counts
    inferred: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)


def origin(spec: str) -> DataSource:
    """`--data`: an existing file, directory or glob, else a hub dataset id (`org/name`)."""
    from pathlib import Path

    if Path(spec).exists() or GLOB_CHARS.search(spec) or Path(spec).suffix.lower().lstrip(".") in FORMATS:
        return DataSource(path=spec)  # a missing file is then "file not found", not an unknown hub dataset
    if HUB_ID.match(spec):
        return DataSource(hub_id=spec)
    raise DatasetError(f"--data {spec}: neither a file, a directory nor a hub dataset id (org/name)")


def sample(source: DataSource) -> tuple[list[dict[str, Any]], list[str]]:
    """Up to SAMPLE_ROWS rows (objects) and a note per row that is not one (file and row named)."""
    rows, unreadable = [], []
    for file, number, raw in islice(read_rows(source, source_fingerprint(source)), SAMPLE_ROWS):
        if isinstance(raw, dict):
            rows.append(raw)
        else:
            unreadable.append(f"{file} row {number}: {raw if isinstance(raw, Exception) else 'not an object'}")
    if not rows:
        raise DatasetError(f"--data {source.label}: no rows" + (f" ({unreadable[0]})" if unreadable else ""))
    return rows, unreadable


def describe(values: list[Any]) -> str:
    """What a column holds, in a few words (`text, 12-340 chars`, `integer, 10 distinct`, `list of {from, value}`)."""
    present = [v for v in values if v is not None]
    if not present:
        return "empty"
    if all(isinstance(v, str) for v in present):
        lengths = [len(v) for v in present]
        return f"text, {min(lengths)}-{max(lengths)} chars, {len(set(present))} distinct"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return f"integer, {len(set(present))} distinct"
    if all(isinstance(v, list) and v and all(isinstance(t, dict) for t in v) for v in present):
        keys = list(dict.fromkeys(k for v in present for t in v for k in t))
        return f"list of {{{', '.join(keys)}}}"
    return ", ".join(sorted({type(v).__name__ for v in present}))


def inspect_data(spec: str) -> Inspection:
    source = origin(spec)
    rows, unreadable = sample(source)
    names = list(dict.fromkeys(k for row in rows for k in row))
    columns = {name: describe([row.get(name) for row in rows]) for name in names}
    found = _turns(source, rows, columns) or _pair(source, rows, names) or _label_set(source, rows, columns)
    if found is None:
        raise DatasetError(f"--data {spec}: cannot tell which columns hold the conversation (columns: "
                           + "; ".join(f"{k}: {v}" for k, v in columns.items())
                           + "); write data.sources[0].fields by hand (configs/tiny-ko.yaml shows the shapes)")
    found.rows, found.columns = len(rows), columns
    if unreadable:
        found.checks.append(f"{len(unreadable)} of the rows looked at are not objects (first: {unreadable[0]}); "
                            "the data step rejects them into rejected.jsonl")
    return found


def _turns(source: DataSource, rows: list[dict[str, Any]], columns: dict[str, str]) -> Inspection | None:
    column = next((name for name, kind in columns.items() if kind.startswith("list of {")
                   and ({"role", "content"} <= set(_keys(kind)) or {"from", "value"} <= set(_keys(kind)))), None)
    if column is None:
        return None
    sharegpt = "from" in _keys(columns[column]) and "role" not in _keys(columns[column])
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    seen = Counter(turn.get(role_key) for row in rows for turn in row.get(column) or [] if isinstance(turn, dict))
    mapping = {**({"role_key": role_key, "content_key": content_key} if sharegpt else {})}
    inspection = Inspection(source=source, shape="", rows=0, columns={})
    guessed = {name: ROLE_GUESSES[name] for name in seen if name not in DEFAULT_ROLES and name in ROLE_GUESSES}
    if guessed:
        mapping["roles"] = guessed
        inspection.checks.append("role names mapped by guess: " + ", ".join(f"{k} -> {v}" for k, v in guessed.items()))
    unknown = [name for name in seen if name not in DEFAULT_ROLES and name not in guessed]
    if unknown:
        inspection.checks.append(f"role name(s) {', '.join(map(repr, unknown))} are not known: their rows are "
                                 "rejected until fields.roles maps them (e.g. `roles: {bot: assistant}`)")
    tools = "tools" in columns or any(isinstance(turn, dict) and turn.get("tool_calls") for row in rows
                                      for turn in row.get(column) or [])
    calls = seen.get("function_call", 0) + seen.get("observation", 0)
    inspection.shape = (("ShareGPT conversations" if sharegpt else "chat messages")
                        + (" with tool calls" if tools or calls else ""))
    inspection.source = source.model_copy(update={"fields": FieldMapping.model_validate({"messages": column,
                                                                                          **mapping})})
    inspection.inferred.append(f"turns in column {column!r}" + (f" ({role_key}/{content_key} keys)" if sharegpt
                                                                 else "") + "; role names seen: "
                               + ", ".join(f"{name} ({count})" for name, count in seen.most_common()))
    if tools:
        inspection.inferred.append("tool calls are trained as the assistant's turns, tool results are not "
                                   "(masked); the `tools` column is rendered into the system turn")
    return inspection


def _keys(kind: str) -> list[str]:
    return kind.removeprefix("list of {").removesuffix("}").split(", ")


def _pair(source: DataSource, rows: list[dict[str, Any]], names: list[str]) -> Inspection | None:
    prompt, response = next(((p, r) for p, r in PAIRS if p in names and r in names), (None, None))
    if prompt is None or response is None:
        return None
    alpaca = prompt == "instruction" and "input" in names and response == "output"
    mapping = {"prompt": prompt, "response": response, **({"input": "input"} if alpaca else {}),
               **({"system": "system"} if "system" in names else {})}
    inspection = _with_labels(source, mapping, rows, response, "alpaca" if alpaca else "prompt/response")
    inspection.inferred.insert(0, f"user turn from {prompt!r}" + (" with 'input' joined after a newline when not "
                                                                  "empty" if alpaca else "")
                               + f", assistant turn from {response!r}"
                               + (", system turn from 'system'" if "system" in names else ""))
    return inspection


def _label_set(source: DataSource, rows: list[dict[str, Any]], columns: dict[str, str]) -> Inspection | None:
    text = next((name for name in TEXT_COLUMNS if columns.get(name, "").startswith("text")), None)
    label = next((name for name in LABEL_COLUMNS if name in columns and name != text), None)
    if text is None or label is None:
        return None
    # A template, not the column: label values may be integer ids, and the assistant turn must be text.
    inspection = _with_labels(source, {"prompt": text, "response_template": f"{{{label}}}"}, rows, label,
                              "text/label")
    inspection.inferred.insert(0, f"user turn from {text!r}, assistant turn the {label!r} value")
    return inspection


def _with_labels(source: DataSource, mapping: dict[str, str], rows: list[dict[str, Any]], answer: str,
                 shape: str) -> Inspection:
    """The inspection of a single-turn shape; a label set when the answers are few distinct values."""
    counts = Counter(row.get(answer) for row in rows if row.get(answer) not in (None, ""))
    few = len(counts) <= LABEL_SET_MAX and len(counts) * ROWS_PER_LABEL <= len(rows)
    inspection = Inspection(source=source.model_copy(update={"fields": FieldMapping.model_validate(mapping)}),
                            shape=f"{shape}, a label set" if few else shape, rows=0, columns={},
                            labels=counts if few else None)
    if not few:
        return inspection
    inspection.inferred.append(f"{answer!r} holds {len(counts)} distinct values over {len(rows)} rows: a label "
                               "set, judged by held-out accuracy")
    if all(isinstance(value, int) or str(value).isdecimal() for value in counts):  # a CSV's ids are text
        ids = sorted(int(value) for value in counts)
        inspection.checks.append(f"{answer!r} holds integer ids ({ids[0]}..{ids[-1]}): the model learns to answer "
                                 "the numbers; fields.label_names names them (index = id)")
    if "prompt" in mapping:
        inspection.checks.append("the user turn is the bare text: a prompt_template with an instruction (e.g. "
                                 f"\"Classify: {{{mapping['prompt']}}}\") helps a base that follows instructions")
    return inspection
