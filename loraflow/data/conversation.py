"""One raw row -> one conversation: the per-row seam of the data step.

`to_conversation(raw, fields, max_chars)` maps a row of a source through its field mapping to a `Conversation`
(chat messages with roles system, user, assistant, tool, and the row's tool definitions), or raises `RowError`
with the reason the row is rejected (build_dataset writes it to rejected.jsonl with the source, file and row).
The shapes people have: chat `messages` (OpenAI's, tool calls and tool results included), ShareGPT's
`conversations` of {from, value} (role names mapped by `fields.roles`, its `function_call`/`observation` turns
become tool calls and results), and single-turn rows (prompt/response columns, alpaca's `input` joined to the
instruction, `str.format` templates, label ids named by `label_names`).

A conversation is [system] then user and assistant turns in turn; an assistant turn may call tools instead of (or
besides) answering, and the tool results follow it before the next assistant turn. Tool calls are stored as Qwen's
template and vLLM render them: `{"type": "function", "function": {"name", "arguments": {...}}}` with the arguments
as a JSON object (OpenAI sends them as a string of JSON; vLLM parses it before rendering), bare tool definitions
(`{name, description, parameters}`, as LLaMA-Factory stores them) as OpenAI's `{"type": "function", "function":
...}`, which is what a client sends at inference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from loraflow.config.data import FieldMapping, template_columns

Message = dict[str, Any]  # {"role", "content": str | None, "tool_calls": list | None}


class RowError(ValueError):
    """Why a row cannot train: the reason rejected.jsonl records for it."""


@dataclass(frozen=True)
class Conversation:
    messages: list[Message]
    tools: list[dict[str, Any]] | None = None

    @cached_property
    def record(self) -> dict[str, Any]:
        """The row as the dataset stores it. Arrow gives every row one schema, and tool definitions and call
        arguments have a shape per tool (their union would render `null` for every key another tool has): those are
        stored as JSON text, which `template_inputs` reads back."""
        return {"messages": [{"role": m["role"], "content": m["content"],
                              "tool_calls": _json(m.get("tool_calls"))} for m in self.messages],
                "tools": _json(self.tools)}

    @cached_property
    def canonical(self) -> str:
        """What duplicates are recognised by and the split hashes."""
        return json.dumps(self.record, ensure_ascii=False, sort_keys=True)


def _json(value: Any) -> str | None:
    return json.dumps(value, ensure_ascii=False) if value else None


def template_inputs(record: dict[str, Any]) -> tuple[list[Message], list[dict[str, Any]] | None]:
    """A stored row back as the chat template's `messages` and `tools`."""
    messages = [{"role": m["role"], "content": m["content"],
                 **({"tool_calls": json.loads(m["tool_calls"])} if m.get("tool_calls") else {})}
                for m in record["messages"]]
    return messages, json.loads(record["tools"]) if record.get("tools") else None


def to_conversation(raw: Any, fields: FieldMapping, max_chars: int) -> Conversation:
    """The conversation of one raw row, or RowError with the reason it is rejected."""
    if not isinstance(raw, dict):
        raise RowError(f"row is a {type(raw).__name__}, not an object")
    messages = _turns(raw, fields) if fields.messages is not None else _single_turn(raw, fields)
    check_conversation(messages, max_chars)
    return Conversation(messages=messages, tools=_tools(raw, fields))


def _turns(raw: dict[str, Any], fields: FieldMapping) -> list[Message]:
    assert fields.messages is not None
    if fields.messages not in raw:
        raise RowError(f"missing field {fields.messages!r}")
    turns = raw[fields.messages]
    if isinstance(turns, str):  # a CSV export holds the turns as JSON text
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise RowError(f"field {fields.messages!r} is text, not a list of turns") from None
    if not isinstance(turns, list):
        raise RowError(f"field {fields.messages!r} is not a list of turns")
    roles = fields.role_names()
    messages: list[Message] = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"turn {index}: not an object")
        if fields.role_key not in turn:
            raise RowError(f"turn {index}: no {fields.role_key!r} key (the turn's keys: {', '.join(turn)}); "
                           "fields.role_key and fields.content_key name them (ShareGPT: from, value)")
        name, content = turn[fields.role_key], turn.get(fields.content_key)
        if not isinstance(name, str) or name not in roles:
            raise RowError(f"turn {index}: unknown role {name!r} (known: {', '.join(roles)}; fields.roles maps "
                           "more)")
        role = roles[name]
        if role == "tool_call":  # ShareGPT's function_call: the assistant's call as JSON text
            messages.append({"role": "assistant", "content": None,
                             "tool_calls": _tool_calls(_parsed(content, index, "the tool call"), index)})
        elif role == "assistant" and turn.get("tool_calls"):
            messages.append({"role": "assistant", "content": content or None,
                             "tool_calls": _tool_calls(turn["tool_calls"], index),
                             "call_ids": [c.get("id") for c in turn["tool_calls"] if isinstance(c, dict)]})
        elif role == "tool":
            text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
            messages.append({"role": "tool", "content": text, "call_id": turn.get("tool_call_id")})
        else:
            messages.append({"role": role, "content": content})
    _match_call_ids(messages)
    return [{"role": m["role"], "content": m["content"], "tool_calls": m.get("tool_calls")} for m in messages]


def _parsed(text: Any, index: int, what: str) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise RowError(f"turn {index}: {what}: not JSON") from None


def _tool_calls(value: Any, index: int) -> list[dict[str, Any]]:
    """OpenAI's calls ({id, type, function: {name, arguments: "<json>"}}) or bare {name, arguments}, one or a
    list, as the template renders them (arguments a JSON object)."""
    calls = value if isinstance(value, list) else [value]
    if not calls:
        raise RowError(f"turn {index}: an empty tool call")
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RowError(f"turn {index}: a tool call without a function name")
        arguments = _parsed(function.get("arguments", {}), index, f"the arguments of tool call {function['name']!r}")
        if not isinstance(arguments, dict):
            raise RowError(f"turn {index}: the arguments of tool call {function['name']!r} are not a JSON object")
        out.append({"type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def _match_call_ids(messages: list[Message]) -> None:
    """A tool result that names its call (`tool_call_id`) must answer a call of the assistant turn before it."""
    ids: list[Any] = []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            ids = [call_id for call_id in message.get("call_ids", []) if call_id is not None]
        elif message["role"] == "tool" and ids and message.get("call_id") is not None and message["call_id"] not in ids:
            raise RowError(f"turn {index}: a tool result for call id {message['call_id']!r}, which the tool call "
                           "before it does not have")


def _tools(raw: dict[str, Any], fields: FieldMapping) -> list[dict[str, Any]] | None:
    value = raw.get(fields.tools) if fields.tools is not None else None
    if value in (None, "", []):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(f"field {fields.tools!r} is not JSON") from None
    if not isinstance(value, list) or not all(isinstance(tool, dict) and ("function" in tool or "name" in tool)
                                              for tool in value):
        raise RowError(f"field {fields.tools!r} is not a list of tool definitions ({{type, function}} or "
                       "{name, description, parameters})")
    return [tool if "function" in tool else {"type": "function", "function": tool} for tool in value] or None


def _single_turn(raw: dict[str, Any], fields: FieldMapping) -> list[Message]:
    missing = [name for name in fields.columns() if name not in raw]
    if missing:
        raise RowError(f"missing field(s) {missing}; the row's columns are {sorted(raw)}")
    row = _with_label_names(raw, fields)
    prompt = _side(row, fields.prompt, fields.prompt_template)
    if fields.input is not None and row[fields.input]:
        prompt = f"{prompt}\n{row[fields.input]}"  # alpaca's input, as LLaMA-Factory joins it
    messages: list[Message] = []
    if fields.system is not None and raw.get(fields.system):
        messages.append({"role": "system", "content": raw[fields.system], "tool_calls": None})
    return [*messages, {"role": "user", "content": prompt, "tool_calls": None},
            {"role": "assistant", "content": _side(row, fields.response, fields.response_template),
             "tool_calls": None}]


def _with_label_names(raw: dict[str, Any], fields: FieldMapping) -> dict[str, Any]:
    """`label_names` applied to the row's `label_column` id, a number or a CSV's digits (hub ClassLabels are already
    names, as is any other text)."""
    names, column = fields.label_names, fields.label_column
    value = raw.get(column)
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value)
    if names is None or isinstance(value, str):
        return raw
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(names):
        raise RowError(f"{column} {value!r} is not an id of label_names (0..{len(names) - 1})")
    return {**raw, column: names[value]}


def _side(row: dict[str, Any], column: str | None, template: str | None) -> Any:
    if template is None:
        return row[column]
    empty = [name for name in template_columns(template) if row.get(name) in (None, "")]
    if empty:  # a template would turn a missing value into the text "None", or an answer into nothing
        raise RowError(f"column(s) {empty} empty")
    return template.format(**row)


def check_conversation(messages: list[Message], max_chars: int) -> None:
    """RowError unless the turns are [system] user assistant, ..., an assistant's tool call followed by its
    results (tool turns) before the next assistant turn, ending with an assistant turn."""
    if not messages:
        raise RowError("no turns")
    for index, turn in enumerate(messages):
        role, content = turn["role"], turn["content"]
        if turn.get("tool_calls") and content is None:
            continue
        if not isinstance(content, str):
            raise RowError(f"turn {index}: content is not text")
        if role in ("system", "user", "assistant") and not content.strip() and not turn.get("tool_calls"):
            raise RowError(f"turn {index}: empty {role} turn")
        if len(content) > max_chars:
            raise RowError(f"turn {index}: {len(content)} chars > max_chars_per_turn {max_chars}")
    start = 1 if messages[0]["role"] == "system" else 0
    expected = "user"
    for index, turn in enumerate(messages[start:], start=start):
        role = turn["role"]
        if role == "tool" and expected not in ("tool", "tool or assistant"):
            raise RowError(f"turn {index}: a tool result without a tool call before it")
        if role not in expected.split(" or "):
            raise RowError(f"turn {index}: expected {expected}, found {role} (after an optional system turn: user, "
                           "assistant, user, ...; tool results after an assistant's tool call)")
        if role == "user":
            expected = "assistant"
        elif role == "assistant":
            expected = "tool" if turn.get("tool_calls") else "user"
        else:
            expected = "tool or assistant"
    if messages[-1]["role"] != "assistant":
        raise RowError("conversation does not end with an assistant turn")
