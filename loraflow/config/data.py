"""Data sources and the rules a row must pass to become training data."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from loraflow.config.base import Section


class FieldMapping(Section):
    """How a source's columns become chat `messages`.

    Either `messages` names a column holding a list of {role, content} turns, or
    `prompt` + `response` (and optionally `system`) name plain text columns.
    """

    messages: str | None = None
    prompt: str | None = None
    response: str | None = None
    system: str | None = None
    role_key: str = "role"
    content_key: str = "content"

    @model_validator(mode="before")
    @classmethod
    def _one_shape(cls, raw: object) -> object:
        if not isinstance(raw, dict):
            return raw
        pair = raw.get("prompt") is not None or raw.get("response") is not None
        if raw.get("messages") is not None and pair:
            raise ValueError("set either `messages` or `prompt`+`response`, not both")
        if pair and (raw.get("prompt") is None or raw.get("response") is None):
            raise ValueError("`prompt` and `response` must be set together")
        if raw.get("messages") is None and not pair:
            return {**raw, "messages": "messages"}
        return raw


class DataSource(Section):
    """Local files or a hub dataset; same loading path.

    `path`: a jsonl/json/csv/parquet file, a directory (every file of those formats in it, recursively) or a glob
    (`data/*.jsonl`, `data/**/*.parquet`), read in sorted order and keyed by the files' contents. `format`, when
    set, applies to every file; else each file's suffix decides. `revision`: a branch, tag or commit of `hub_id`
    (default `main`); a branch or tag is resolved to its commit at each run, so new commits mean a new dataset.
    """

    path: str | None = None
    hub_id: str | None = None
    revision: str | None = None
    subset: str | None = None
    split: str = "train"
    format: Literal["auto", "jsonl", "json", "csv", "parquet"] = "auto"
    fields: FieldMapping = Field(default_factory=lambda: FieldMapping(messages="messages"))
    limit: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_origin(self) -> DataSource:
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("set exactly one of `path` or `hub_id`")
        return self

    @property
    def label(self) -> str:
        return self.path or f"{self.hub_id}@{self.revision or 'main'}"


class DataConfig(Section):
    sources: list[DataSource] = Field(min_length=1)
    system_prompt: str | None = None
    max_chars_per_turn: int = Field(default=8000, gt=0)
    dedupe: bool = True
    eval_fraction: float = Field(default=0.1, gt=0, lt=0.5)
    eval_max_rows: int | None = Field(default=None, gt=0)
    seed: int = 42
