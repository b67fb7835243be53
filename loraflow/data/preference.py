"""Preference pairs (training.method dpo): a row's prompt, better and worse answers mapped to TRL's conversational
preference format, `{"prompt": [turns], "chosen": [one assistant turn], "rejected": [one assistant turn]}`, and
checked.

Each side is a string or a list of {role, content} turns (the keys named by `role_key` / `content_key`). A string
prompt is one user turn, a string answer one assistant turn. Without a `prompt` column, `chosen` and `rejected` are
whole conversations and the turns they share are the prompt (TRL's `extract_prompt`). The row's `system` column,
else `data.system_prompt`, goes first in a prompt that has no system turn, as for chat rows. A pair is rejected
(into rejected.jsonl, with the reason) unless its prompt is [system] user (assistant user)* and both answers are
one non-empty assistant turn within `max_chars_per_turn`, and different.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from loraflow.config.data import DataConfig, FieldMapping

Turns = list[dict[str, Any]]
SIDES = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant")


def _turns(value: Any, column: str, fields: FieldMapping, role: str) -> Turns:
    """A side as turns: a string is one turn of `role`; a list keeps its own roles."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value and all(isinstance(turn, dict) for turn in value):
        return [{"role": turn.get(fields.role_key), "content": turn.get(fields.content_key)} for turn in value]
    raise ValueError(f"field {column!r} is neither text nor a list of turns")


def _sides(raw: dict[str, Any], fields: FieldMapping) -> dict[str, Turns]:
    assert fields.chosen is not None and fields.rejected is not None  # FieldMapping.is_pair
    chosen = _turns(raw[fields.chosen], fields.chosen, fields, "assistant")
    rejected = _turns(raw[fields.rejected], fields.rejected, fields, "assistant")
    if fields.prompt is not None:
        return {"prompt": _turns(raw[fields.prompt], fields.prompt, fields, "user"), "chosen": chosen,
                "rejected": rejected}
    if chosen == rejected:
        raise ValueError("chosen and rejected are the same conversation")
    from trl.data_utils import extract_prompt  # only the implicit-prompt shape needs it

    return extract_prompt({"chosen": chosen, "rejected": rejected})


def _with_system(prompt: Turns, raw: dict[str, Any], fields: FieldMapping, system_prompt: str | None) -> Turns:
    system = raw.get(fields.system) if fields.system is not None else None
    if system is not None and not isinstance(system, str):
        raise ValueError(f"field {fields.system!r} is not text")
    system = system or system_prompt
    if system and prompt and prompt[0].get("role") != "system":
        return [{"role": "system", "content": system}, *prompt]
    return prompt


def _problem(pair: dict[str, Turns], max_chars: int) -> str | None:
    """Why a mapped pair is unusable, or None."""
    for side in SIDES:
        for index, turn in enumerate(pair[side]):
            role, content = turn.get("role"), turn.get("content")
            if role not in ROLES:
                return f"{side} turn {index}: unknown role {role!r}"
            if not isinstance(content, str):
                return f"{side} turn {index}: content is not text"
            if not content.strip():
                return f"{side} turn {index}: empty {role} turn"
            if len(content) > max_chars:
                return f"{side} turn {index}: {len(content)} chars > max_chars_per_turn {max_chars}"
    prompt = pair["prompt"]
    body = prompt[1:] if prompt and prompt[0]["role"] == "system" else prompt
    expected = ["user" if index % 2 == 0 else "assistant" for index in range(len(body))]
    if not body or [turn["role"] for turn in body] != expected or expected[-1] != "user":
        return "prompt must be [system] user (assistant user)*, ending with the user turn the answers reply to"
    for side in ("chosen", "rejected"):
        if [turn["role"] for turn in pair[side]] != ["assistant"]:
            return f"{side} must be one assistant turn (got roles {[turn['role'] for turn in pair[side]]})"
    if pair["chosen"][0]["content"].strip() == pair["rejected"][0]["content"].strip():
        return "chosen and rejected are the same answer"
    return None


@dataclass(frozen=True)
class PreferencePair:
    """A checked pair as the data step keeps a row (what loraflow/data/conversation.py's Conversation is for chat)."""

    prompt: Turns
    chosen: Turns
    rejected: Turns
    tools = None  # a preference pair carries no tool definitions

    @property
    def record(self) -> dict[str, Turns]:
        """The row as the dataset stores it: TRL's conversational preference format."""
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}

    @property
    def canonical(self) -> str:
        """What duplicates are recognised by and the split hashes."""
        return json.dumps(self.record, ensure_ascii=False, sort_keys=True)

    @property
    def messages(self) -> Turns:
        """The conversation the chosen answer completes (its last turn is the answer the data step's stats count)."""
        return [*self.prompt, *self.chosen]


def to_pair(raw: Any, fields: FieldMapping, data: DataConfig) -> PreferencePair:
    """The row as a checked preference pair; a ValueError names what is wrong (the row goes to rejected.jsonl)."""
    if not isinstance(raw, dict):
        raise ValueError(f"row is a {type(raw).__name__}, not an object")
    missing = [name for name in fields.columns() if name not in raw]
    if missing:
        raise ValueError(f"missing field(s) {missing}; the row's columns are {sorted(raw)}")
    pair = _sides(raw, fields)
    reason = _problem(pair, data.max_chars_per_turn)  # turn numbers as the row has them
    if reason is not None:
        raise ValueError(reason)
    return PreferencePair(prompt=_with_system(pair["prompt"], raw, fields, data.system_prompt), chosen=pair["chosen"],
                          rejected=pair["rejected"])
