"""Data sources and the rules a row must pass to become training data."""

from __future__ import annotations

import string
from typing import Literal

from pydantic import Field, model_validator

from loraflow.config.base import Section

ChatRole = Literal["system", "user", "assistant", "tool", "tool_call"]
# The chat roles themselves, ShareGPT's (`human`, `gpt`) and its function-calling ones (LLaMA-Factory, glaive:
# `function_call` holds an assistant's call as JSON, `observation` its result).
DEFAULT_ROLES: dict[str, ChatRole] = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                                      "human": "user", "gpt": "assistant", "function_call": "tool_call",
                                      "observation": "tool"}


def template_columns(template: str) -> list[str]:
    """The columns a `str.format` template names (`"의도: {text}"` -> ["text"])."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


class FieldMapping(Section):
    """How a source's columns become chat `messages`.

    Either `messages` names a column holding a list of turns (OpenAI's {role, content, tool_calls}; ShareGPT's
    {from, value} with `role_key: from`, `content_key: value`; role names mapped by `roles`), or each side of a
    single-turn chat comes from a column (`prompt`, `response`; alpaca's `input` joined to the prompt) or a
    `str.format` template over the row's columns (`prompt_template: "다음 문의의 의도를 고르세요: {text}"`,
    `response_template: "{label}"`); `system` optionally names a column. `label_names` maps the integer ids of
    `label_column` to names (for local files; a hub dataset's `ClassLabel` columns are mapped by their own names).
    A preference pair (training.method dpo) maps `chosen` and `rejected`, with `prompt` (and optionally `system`):
    loraflow/data/preference.py.
    """

    messages: str | None = Field(default=None, description="The column holding a list of {role, content} turns "
                                 "(the default shape when no prompt/response is set: column `messages`).")
    prompt: str | None = Field(default=None, description="The column of the user turn of a single-turn chat.")
    response: str | None = Field(default=None, description="The column of the assistant turn of a single-turn chat.")
    prompt_template: str | None = Field(default=None, description="A `str.format` template over the row's columns "
                                        "for the user turn (instead of `prompt`), e.g. `의도: {text}`.")
    response_template: str | None = Field(default=None, description="A `str.format` template over the row's "
                                          "columns for the assistant turn (instead of `response`), e.g. `{label}`.")
    system: str | None = Field(default=None, description="A column holding each row's system prompt (overrides "
                               "`data.system_prompt` for that row).")
    input: str | None = Field(default=None, description="A column joined to the `prompt` column's text after a "
                              "newline when not empty (alpaca's `input`).")
    role_key: str = Field(default="role", description="The key of a turn's role inside the `messages` column "
                          "(ShareGPT: `from`).")
    content_key: str = Field(default="content", description="The key of a turn's text inside the `messages` column "
                             "(ShareGPT: `value`).")
    roles: dict[str, ChatRole] = Field(
        default_factory=dict, description="Role names of the source mapped to chat roles, on top of the defaults "
        "(system, user, assistant, tool; ShareGPT's human -> user, gpt -> assistant, function_call -> tool_call, "
        "observation -> tool). `tool_call`: the turn's text is an assistant's tool call as JSON ({name, "
        "arguments}, or a list of them).")
    tools: str | None = Field(default="tools", description="The column of each row's tool definitions (OpenAI "
                              "`tools`: a list, or a JSON string of one), rendered by the chat template; a row "
                              "without it has none. None: never read.")
    label_column: str = Field(default="label", description="The column whose integer ids `label_names` maps.")
    label_names: list[str] | None = Field(default=None, min_length=1, description="Names of the integer ids of "
                                          "`label_column` (index = id), for local files; None: the ids as they are.")
    chosen: str | None = Field(default=None, description="A preference pair's better answer (training.method dpo): "
                               "the column of a string or a list of {role, content} turns. With `prompt`, the "
                               "answer alone; without, the whole conversation, whose turns shared with `rejected` "
                               "are the prompt (TRL's implicit prompt).")
    rejected: str | None = Field(default=None, description="The column of the pair's worse answer, shaped like "
                                 "`chosen`.")

    @model_validator(mode="before")
    @classmethod
    def _one_shape(cls, raw: object) -> object:
        if not isinstance(raw, dict):
            return raw
        if raw.get("chosen") is not None or raw.get("rejected") is not None:
            return _pair_shape(raw)
        sides = {side: [raw.get(side) is not None, raw.get(f"{side}_template") is not None]
                 for side in ("prompt", "response")}
        for side, (column, template) in sides.items():
            if column and template:
                raise ValueError(f"set either `{side}` or `{side}_template`, not both")
        pair = any(any(given) for given in sides.values())
        if raw.get("messages") is not None and pair:
            raise ValueError("set either `messages` or `prompt`+`response` (or their templates), not both")
        if pair and not all(any(given) for given in sides.values()):
            raise ValueError("`prompt` and `response` must be set together (each side a column or its "
                             "`_template`)")
        for name in ("prompt_template", "response_template"):
            if raw.get(name) is not None:
                try:
                    columns = template_columns(raw[name])
                except ValueError as error:
                    raise ValueError(f"`{name}` is not a str.format template: {error}") from None
                if not columns:
                    raise ValueError(f"`{name}` names no column (write them as {{column}})")
        if raw.get("input") is not None and raw.get("prompt") is None:
            raise ValueError("`input` is joined to the `prompt` column: set `prompt` too (a `prompt_template` "
                             "names every column itself)")
        if raw.get("messages") is None and not pair:
            return {**raw, "messages": "messages"}
        return raw

    def role_names(self) -> dict[str, ChatRole]:
        """Every role name a turn may carry and the chat role it becomes."""
        return {**DEFAULT_ROLES, **self.roles}

    def columns(self) -> list[str]:
        """Every column the mapping reads (checked against each file before any row is mapped)."""
        if self.is_pair:
            return [name for name in (self.prompt, self.chosen, self.rejected) if name]
        if self.messages is not None:
            return [self.messages]
        names = [self.prompt, self.input, self.response, *template_columns(self.prompt_template or ""),
                 *template_columns(self.response_template or "")]
        return list(dict.fromkeys(name for name in names if name))

    @property
    def is_pair(self) -> bool:
        """A preference pair (prompt/chosen/rejected) rather than a conversation."""
        return self.chosen is not None


def _pair_shape(raw: dict) -> dict:
    if raw.get("chosen") is None or raw.get("rejected") is None:
        raise ValueError("`chosen` and `rejected` must be set together (a preference pair)")
    others = [name for name in ("messages", "response", "prompt_template", "response_template")
              if raw.get(name) is not None]
    if others:
        raise ValueError(f"a preference pair maps `prompt`, `chosen` and `rejected` (and `system`): unset {others}")
    return raw


class DataSource(Section):
    """Local files or a hub dataset; same loading path.

    `path`: a jsonl/json/csv/parquet file, a directory (every file of those formats in it, recursively) or a glob
    (`data/*.jsonl`, `data/**/*.parquet`), read in sorted order and keyed by the files' contents. `format`, when
    set, applies to every file; else each file's suffix decides. `revision`: a branch, tag or commit of `hub_id`
    (default `main`); a branch or tag is resolved to its commit at each run, so new commits mean a new dataset.
    """

    path: str | None = Field(default=None, description="A jsonl/json/csv/parquet file, a directory or a glob, "
                             "relative to the working directory (exactly one of `path`, `hub_id`).")
    hub_id: str | None = Field(default=None, description="A Hugging Face Hub dataset id (exactly one of `path`, "
                               "`hub_id`).")
    revision: str | None = Field(default=None, description="A branch, tag or commit of `hub_id` (None: `main`), "
                                 "resolved to its commit at each run.")
    subset: str | None = Field(default=None, description="The hub dataset's configuration (subset) name.")
    split: str = Field(default="train", description="The hub dataset's split to read.")
    format: Literal["auto", "jsonl", "json", "csv", "parquet"] = Field(
        default="auto", description="The format of every file of `path`; `auto`: each file's suffix decides.")
    fields: FieldMapping = Field(default_factory=lambda: FieldMapping(messages="messages"),
                                 description="How the source's columns become chat `messages` (or preference "
                                 "pairs).")
    limit: int | None = Field(default=None, gt=0, description="Read at most this many rows of the source "
                              "(None: all).")

    @model_validator(mode="after")
    def _one_origin(self) -> DataSource:
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("set exactly one of `path` or `hub_id`")
        return self

    @property
    def label(self) -> str:
        return self.path or f"{self.hub_id}@{self.revision or 'main'}"


class DataConfig(Section):
    sources: list[DataSource] = Field(min_length=1, description="The data sources, concatenated in this order.")
    system_prompt: str | None = Field(default=None, description="A system turn put first in every conversation "
                                      "that has none (None: no system turn).")
    max_chars_per_turn: int = Field(default=8000, gt=0, description="A row with a longer turn is rejected (into "
                                    "rejected.jsonl).")
    dedupe: bool = Field(default=True, description="Reject rows whose conversation exactly repeats an earlier one.")
    eval_fraction: float = Field(default=0.1, gt=0, lt=0.5, description="The share of rows held out for "
                                 "evaluation (split by a seeded hash of each row, stable across runs).")
    eval_max_rows: int | None = Field(default=None, gt=0, description="At most this many held-out rows (the "
                                      "rest of the fraction trains); None: the whole fraction.")
    seed: int = Field(default=42, description="The seed of the hash that splits rows into train and held-out.")
