"""format_chat: render each conversation with the chat template and tokenize it with an assistant-only mask.

The mask comes from the template's `{% generation %}` markers, checked on every row: one span per assistant turn
(text or tool calls), each ending with the end-of-turn token (a model never trained on its closing `<|im_end|>`
never learns to stop) and none reaching into another turn (`<|im_start|>` inside a span would train the model on
a user turn or a tool result). A row's `tools` go to the template, which renders them into the system turn.
A DPO job's preference pairs (loraflow/data/preference.py) become the token ids TRL's DPOTrainer reads: each answer
is the assistant span the template marks after the prompt, checked the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from datasets import DatasetDict, load_from_disk

from loraflow.base.load import load_tokenizer
from loraflow.config.model import ModelConfig
from loraflow.config.training import TrainingConfig
from loraflow.data.conversation import Message, template_inputs
from loraflow.outputs import write_json
from loraflow.results import ChatResult, DatasetResult
from loraflow.templates import template_sha

END_OF_TURN = "<|im_end|>"
START_OF_TURN = "<|im_start|>"
# A DPO job's tokenized pairs, as TRL's DPOTrainer reads them.
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


class ChatFormatError(ValueError):
    """The template does not produce a usable assistant mask."""


def assistant_spans(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive 1s."""
    spans, start = [], None
    for index, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = index
        elif not bit and start is not None:
            spans.append((start, index))
            start = None
    return spans


def tokenize_conversation(tokenizer: Any, messages: list[Message], end_of_turn_id: int,
                          tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    encoded = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    spans = assistant_spans(mask)
    turns = sum(1 for m in messages if m["role"] == "assistant")
    if len(spans) != turns:
        raise ChatFormatError(f"template marks {len(spans)} assistant spans for {turns} assistant turns; "
                              "does it wrap replies in {% generation %}?")
    start_of_turn_id = tokenizer.convert_tokens_to_ids(START_OF_TURN)
    for start, end in spans:
        if ids[end - 1] != end_of_turn_id:
            raise ChatFormatError(f"an assistant span ends with token {ids[end - 1]}, not {END_OF_TURN}; the "
                                  "model would never learn to stop")
        if start_of_turn_id in ids[start:end]:
            raise ChatFormatError(f"an assistant span holds {START_OF_TURN}: it runs into another turn, which the "
                                  "model would be trained to write")
    return {"input_ids": ids, "assistant_masks": mask, "length": len(ids), "labeled": sum(mask), "tokens": len(ids)}


def tokenize_pair(tokenizer: Any, pair: dict[str, Any], end_of_turn_id: int) -> dict[str, Any]:
    """`prompt_ids`, `chosen_ids`, `rejected_ids`: the prompt rendered with each answer, split where the answer's
    span starts (so the prompt ends with the assistant header, as TRL's own tokenization does). `length` is the
    longer sequence (what max_length bounds), `tokens` both (what a training step reads)."""
    cut = {}
    for side in ("chosen", "rejected"):
        encoded = tokenize_conversation(tokenizer, [*pair["prompt"], *pair[side]], end_of_turn_id)
        start, end = assistant_spans(encoded["assistant_masks"])[-1]
        cut[side] = (encoded["input_ids"][:start], encoded["input_ids"][start:end])
    (prompt, chosen), (other_prompt, rejected) = cut["chosen"], cut["rejected"]
    if prompt != other_prompt:
        raise ChatFormatError("the template renders the prompt differently before chosen and rejected")
    return {**dict(zip(PAIR_COLUMNS, (prompt, chosen, rejected), strict=True)),
            "length": len(prompt) + max(len(chosen), len(rejected)), "labeled": len(chosen) + len(rejected),
            "tokens": 2 * len(prompt) + len(chosen) + len(rejected)}


def _tokenize_record(tokenizer: Any, record: dict[str, Any], end_of_turn_id: int) -> dict[str, Any]:
    messages, tools = template_inputs(record)
    return tokenize_conversation(tokenizer, messages, end_of_turn_id, tools=tools)


def _length_histogram(lengths: list[int], max_length: int, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=40, color="#4c72b0")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length={max_length}")
    ax.set_xlabel("tokens per conversation")
    ax.set_ylabel("conversations")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_chat(dataset: DatasetResult, model: ModelConfig, training: TrainingConfig, out_dir: Path,
                key: str) -> ChatResult:
    tokenizer = load_tokenizer(model)
    end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if end_of_turn_id is None or end_of_turn_id == tokenizer.unk_token_id:
        raise ChatFormatError(f"model.base: tokenizer has no {END_OF_TURN} token")
    splits = load_from_disk(dataset.dataset_dir)
    pairs = training.method == "dpo"
    tokenized = splits.map(
        lambda row: tokenize_pair(tokenizer, row, end_of_turn_id) if pairs
        else _tokenize_record(tokenizer, row, end_of_turn_id),
        remove_columns=splits["train"].column_names,
        desc="applying chat template",
    )
    kept = tokenized.filter(lambda row: row["length"] <= training.max_length, desc="dropping over-length rows")
    dropped = {name: len(tokenized[name]) - len(kept[name]) for name in tokenized}
    if len(kept["train"]) == 0 or len(kept["eval"]) == 0:
        raise ChatFormatError(f"training.max_length={training.max_length}: every row of a split is longer")
    DatasetDict({name: kept[name].remove_columns(["length", "labeled", "tokens"]) for name in kept}).save_to_disk(
        str(out_dir / "tokenized")
    )
    lengths = list(tokenized["train"]["length"]) + list(tokenized["eval"]["length"])
    _length_histogram(lengths, training.max_length, out_dir / "token_lengths.png")
    stats = {
        "train_rows": len(kept["train"]),
        "eval_rows": len(kept["eval"]),
        "dropped_over_max_length": dropped,
        "train_tokens": int(sum(kept["train"]["tokens"])),  # DPO: both sequences of each pair
        "train_assistant_tokens": int(sum(kept["train"]["labeled"])),
        "max_length": training.max_length,
        "length_mean": float(np.mean(lengths)),
        "length_p50": float(np.percentile(lengths, 50)),
        "length_p95": float(np.percentile(lengths, 95)),
        "length_max": int(max(lengths)),
    }
    write_json(out_dir / "stats.json", stats)
    return ChatResult(key=key, path=str(out_dir), dataset_sha=dataset.dataset_sha,
                      template_sha=template_sha(model.chat_template), stats=stats)
