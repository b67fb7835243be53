import math

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from loraflow.evaluation.perplexity import _batches, assistant_nll, assistant_perplexity


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


def test_chunked_nll_equals_the_whole_batch_fp32_computation(tiny_base_dir):
    """Per sequence, `chunk` labelled positions at a time, only those upcast: the same sum as one cross-entropy over
    the whole batch's fp32 logits (what perplexity computed before), for chunks smaller than, equal to and larger
    than a row's labelled positions."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(4, 500, (n,), generator=generator).tolist(),
             "assistant_masks": [int(i >= n // 3) for i in range(n)]} for n in (37, 64, 5, 50)]
    ids, attention, labels = next(_batches(Dataset.from_list(rows), 4, pad_id=3))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
    whole = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                              labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum").item()
    expected_count = int((labels[:, 1:] != -100).sum())
    for chunk in (1, 7, 1024):
        total, count = assistant_nll(logits, labels, chunk=chunk)
        assert count == expected_count
        assert math.isclose(total, whole, rel_tol=1e-6), (chunk, total, whole)
