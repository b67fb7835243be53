"""Reading a source's raw rows: local files and hub datasets through one path (`read_rows`), used by the data step
and by `loraflow new` when it looks at data before any config exists.

What is read is what a fingerprint names (loraflow/data/sources.py): a local source's files in sorted order, a hub
dataset at its pinned commit (offline: that commit's snapshot in the hub cache).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasets import ClassLabel, Dataset, Features, Value, load_dataset
from datasets.exceptions import DatasetGenerationError

from loraflow.config.data import DataSource
from loraflow.data.sources import SourceFingerprint, file_format
from loraflow.hub import cached_snapshot

log = logging.getLogger(__name__)


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


def _csv_as_written(file: Path, fmt: str) -> dict[str, Any]:
    """A CSV's cells as the text they are: pandas would read an id column with one empty cell as floats (`4.0`, and
    the model would learn to answer that) and `NA` or `None` as missing; every column is a string, an empty cell
    is empty text (a turn the data step rejects as empty)."""
    if fmt != "csv":
        return {}
    with file.open(encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh), [])
    return {"features": Features({name: Value("string") for name in header}), "keep_default_na": False}


def read_rows(source: DataSource, fingerprint: SourceFingerprint,
              labels: dict[str, list[str]] | None = None) -> Iterator[tuple[str, int, Any]]:
    """(file, row number, raw row) of the files the fingerprint names, in its (sorted) order; for a hub source the
    "file" is the split. JSON lines are parsed one by one so that a broken line is a rejected row (an exception in
    place of the row), not a crashed load; other formats go through `datasets.load_dataset` (the same call as hub
    datasets), with `ClassLabel` columns as names (recorded in `labels`) and CSV cells as the text they are. An
    empty file has no rows."""
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
        if file.stat().st_size == 0:
            continue
        # Each file with its own builder: a directory may mix formats whose columns datasets cannot merge.
        try:
            loaded = load_dataset(fmt, data_files=str(file), split="train", **_csv_as_written(file, fmt))
        except DatasetGenerationError as error:
            raise DatasetError(f"{file}: cannot be read as {fmt}: {error.__cause__ or error}") from error
        for number, row in enumerate(_named_rows(loaded, labels), start=1):
            yield entry.path, number, row
