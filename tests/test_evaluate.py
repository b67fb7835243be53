import math

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from loraflow.evaluation.perplexity import assistant_perplexity


def test_tuned_perplexity_beats_base_on_held_out_assistant_tokens(step_results):
    metrics = step_results["evaluated"].metrics
    assert metrics["tuned/perplexity"] < 0.5 * metrics["base/perplexity"], metrics
    assert metrics["eval/assistant_tokens"] > 100


def test_perplexity_is_token_weighted_over_assistant_tokens_only(tiny_base_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    rows = [
        {"input_ids": [5, 6, 7, 8, 9, 10], "assistant_masks": [0, 0, 0, 1, 1, 1]},
        {"input_ids": [11, 12, 13], "assistant_masks": [0, 1, 1]},
    ]
    # by hand: sum of -log p(token | prefix) over labelled positions / their count
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            for position in range(1, len(row["input_ids"])):
                if row["assistant_masks"][position]:
                    total -= logprobs[position - 1, row["input_ids"][position]].item()
                    count += 1
    scores = assistant_perplexity(model, Dataset.from_list(rows), pad_id=3, batch_size=2)
    assert scores["tokens"] == count == 5
    assert math.isclose(scores["perplexity"], math.exp(total / count), rel_tol=1e-4)
