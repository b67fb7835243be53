"""Preference accuracy and margin on the held-out pairs of a DPO job, for each model measured (the base, the starting
point, the tuned adapter): how often the model prefers `chosen`, and by how much.

A model's preference is DPO's own measure: the summed log-probability of an answer's tokens given the prompt (TRL's
`logps`). `preference_accuracy` is the share of pairs where chosen's exceeds rejected's, `preference_margin` the
mean gap in nats. DPO's implicit reward margin on a pair is beta x (the tuned margin - the reference's margin), so
the tuned and starting points' margins side by side are the reward margin the training bought, over beta. Each comes
with its standard error over pairs (`_stderr`, as lm-eval reports a score's), which the gate's stderr_tolerance reads.
"""

from __future__ import annotations

import math

import torch
from datasets import Dataset

from loraflow.data.format_chat import PAIR_COLUMNS
from loraflow.evaluation.perplexity import sequence_nlls


def is_pairs(data: Dataset) -> bool:
    """Whether a tokenized split holds preference pairs (format_chat for a DPO job) rather than conversations."""
    return set(PAIR_COLUMNS) <= set(data.column_names)


def _sequence(prompt: list[int], answer: list[int]) -> dict[str, list[int]]:
    return {"input_ids": prompt + answer, "assistant_masks": [0] * len(prompt) + [1] * len(answer)}


def chosen_conversations(pairs: Dataset) -> Dataset:
    """The prompt + chosen sequences as tokenized conversations: what perplexity measures on a DPO job."""
    return Dataset.from_list([_sequence(row["prompt_ids"], row["chosen_ids"]) for row in pairs])


def _both_answers(pairs: Dataset) -> Dataset:
    """Two rows per pair, chosen then rejected, each masked to its answer."""
    return Dataset.from_list([_sequence(row["prompt_ids"], row[side]) for row in pairs
                              for side in ("chosen_ids", "rejected_ids")])


def _mean_and_stderr(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


@torch.no_grad()
def preference_scores(model: torch.nn.Module, pairs: Dataset, *, pad_id: int, batch_size: int = 4,
                      max_rows: int | None = None) -> dict[str, float]:
    """`preference_accuracy`, `preference_margin` and their `_stderr` on the first `max_rows` pairs."""
    if max_rows is not None:
        pairs = pairs.select(range(min(max_rows, len(pairs))))
    if len(pairs) == 0:
        raise ValueError("preference: the eval split has no pairs")
    nlls = sequence_nlls(model, _both_answers(pairs), pad_id=pad_id, batch_size=2 * batch_size, desc="preference")
    margins = [rejected - chosen for (chosen, _), (rejected, _) in zip(nlls[0::2], nlls[1::2], strict=True)]
    accuracy, accuracy_se = _mean_and_stderr([float(margin > 0) for margin in margins])
    margin, margin_se = _mean_and_stderr(margins)
    return {"preference_accuracy": accuracy, "preference_accuracy_stderr": accuracy_se,
            "preference_margin": margin, "preference_margin_stderr": margin_se}
