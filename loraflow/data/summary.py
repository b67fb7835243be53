"""What the data steps did, in words: the build summary (`loraflow data` prints it; the flow logs it and puts it in
a Prefect artifact), the warnings a run carries when a step drops more than half of its rows, the hint that a
label set could be judged by its own metric, and rendered rows with the trained tokens marked.

Everything here reads the steps' `stats` (build_dataset's and format_chat's stats.json), so a cached step is
summarised exactly like a fresh one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraflow.config.evaluation import HeldoutConfig

# A step that keeps less than this share of its rows warns (the CSV kept 48 of 402).
KEEP_AT_LEAST = 0.5
# A label set: few distinct final answers, each seen several times on average (Banking77: 77 over 10,003 rows).
LABEL_SET_MAX = 100
ROWS_PER_LABEL = 5
TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def dataset_summary(stats: dict[str, Any], path: str) -> list[str]:
    """Rows read per source, rejected per reason, duplicates dropped, train/held-out sizes."""
    read, kept = stats["rows_read"], stats["train_rows"] + stats["eval_rows"]
    lines = [f"build_dataset: {read} rows read, {kept} kept ({_share(kept, read)}): {stats['train_rows']} train, "
             f"{stats['eval_rows']} held out; {stats['duplicates']} exact duplicates dropped, "
             f"{stats['rejected_rows'] - stats['duplicates']} rows rejected"]
    lines += [f"- {label}: {counts.get('read', 0)} read, {counts.get('kept', 0)} kept"
              for label, counts in stats["sources"].items()]
    lines += [f"- rejected: {reason} ({count})" for reason, count in stats["rejection_reasons"].items()]
    if stats["rejected_rows"]:
        lines.append(f"- each rejected row with its source, file, row and reason: {Path(path) / 'rejected.jsonl'}")
    if stats.get("rows_with_tools"):
        lines.append(f"- {stats['rows_with_tools']} rows with tools or tool calls")
    return lines


def chat_summary(stats: dict[str, Any]) -> list[str]:
    """Rows tokenized, rows over max_length (dropped, not truncated), token lengths, trained share."""
    dropped = stats["dropped_over_max_length"]
    trained, tokens = stats["train_assistant_tokens"], stats["train_tokens"]
    return [
        f"format_chat: {stats['train_rows']} train, {stats['eval_rows']} held-out rows tokenized; "
        f"{dropped.get('train', 0) + dropped.get('eval', 0)} over training.max_length {stats.get('max_length', '')} "
        "dropped (not truncated: a cut row would lose its closing <|im_end|>)",
        f"- tokens per row: mean {stats['length_mean']:.0f}, median {stats.get('length_p50', float('nan')):.0f}, "
        f"p95 {stats['length_p95']:.0f}, max {stats['length_max']}",
        f"- trained (assistant) tokens: {trained} of {tokens} in the train split ({_share(trained, tokens)})",
    ]


def dataset_warnings(stats: dict[str, Any], path: str) -> list[str]:
    read, kept = stats["rows_read"], stats["train_rows"] + stats["eval_rows"]
    if kept >= KEEP_AT_LEAST * read:
        return []
    return [f"build_dataset kept {kept} of {read} rows ({_share(kept, read)}): {stats['duplicates']} exact "
            f"duplicates, {stats['rejected_rows'] - stats['duplicates']} rejected; see "
            f"{Path(path) / 'rejected.jsonl'}"]


def chat_warnings(stats: dict[str, Any]) -> list[str]:
    dropped = sum(stats["dropped_over_max_length"].values())
    rows = dropped + stats["train_rows"] + stats["eval_rows"]
    if rows - dropped >= KEEP_AT_LEAST * rows:
        return []
    return [f"format_chat dropped {dropped} of {rows} rows longer than training.max_length "
            f"{stats.get('max_length', '')} (p95 {stats['length_p95']:.0f} tokens): raise training.max_length"]


def heldout_hint(stats: dict[str, Any], heldout: HeldoutConfig) -> str | None:
    """A label set trained without eval.heldout: nothing would measure whether the model answers the right label."""
    rows = stats["train_rows"] + stats["eval_rows"]
    distinct = stats.get("distinct_answers", rows)  # outputs built before it was counted: no hint
    if heldout.enabled or stats.get("rows_with_tools") or distinct > LABEL_SET_MAX or distinct * ROWS_PER_LABEL > rows:
        return None
    return (f"the final assistant turns hold {distinct} distinct answers over {rows} rows, a label set: "
            "`eval.heldout: {enabled: true, kind: labels}` judges it by held-out accuracy (and gates on it)")


def marked_tokens(tokenizer: Any, ids: list[int], mask: list[int]) -> str:
    """The row as the model sees it, special tokens included, with the trained tokens (the assistant mask) between
    ⟦ and ⟧."""
    from loraflow.data.format_chat import assistant_spans  # tokenizer-side: not imported by the flow's tasks

    parts, position = [], 0
    for start, end in assistant_spans(mask):
        parts.append(tokenizer.decode(ids[position:start], skip_special_tokens=False))
        parts.append(TRAINED_OPEN + tokenizer.decode(ids[start:end], skip_special_tokens=False) + TRAINED_CLOSE)
        position = end
    parts.append(tokenizer.decode(ids[position:], skip_special_tokens=False))
    return "".join(parts)
