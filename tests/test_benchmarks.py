"""lm-eval benchmarks on tiny-ko: the offline KoBEST tasks, scores checked against a hand computation,
task-name validation, the served-model arguments and the comparison artifacts.
Real lm-eval, real tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lm_eval.tasks._yaml_loader import load_yaml
from peft import PeftModel

from loraflow.base.load import load_tokenizer
from loraflow.config import ConfigError, load_config
from loraflow.config.evaluation import BenchmarkConfig
from loraflow.config.job import JobConfig
from loraflow.config.lora import QuantizationConfig
from loraflow.evaluation.benchmarks import (
    flatten_results,
    resolve_include_path,
    run_benchmarks,
    validate_tasks,
)
from loraflow.evaluation.comparison import write_comparison
from loraflow.tiny import kobest
from loraflow.training.models import load_base_model

REPO = Path(__file__).resolve().parent.parent
LIMIT = 6  # items per task checked by hand


@pytest.fixture(scope="module")
def job(tiny_job: JobConfig) -> JobConfig:
    return tiny_job


@pytest.fixture(scope="module")
def adapter_dir(job: JobConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on the tiny base whose B matrices are non-zero, so it changes the model's scores."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = load_base_model(job.model, QuantizationConfig(method="none"))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bench(job: JobConfig) -> BenchmarkConfig:
    return job.eval.benchmarks.model_copy(update={"limit": LIMIT})


# KoBEST's prompts (lm_eval/tasks/kobest), written out here so the check does not reuse lm-eval's code.
def kobest_request(task: str, doc: dict) -> tuple[str, list[str]]:
    if task.endswith("boolq"):
        return f"{doc['paragraph']} 질문: {doc['question']} 답변: ", ["아니오", "예"]
    if task.endswith("copa"):
        connector = {"원인": " 왜냐하면", "결과": " 그래서"}[doc["question"]]
        return f"{doc['premise']} {connector}", [doc["alternative_1"], doc["alternative_2"]]
    return f"문장: {doc['context']}", [doc[f"ending_{i}"] for i in range(1, 5)]


def loglikelihood(model: torch.nn.Module, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), summed over the continuation's tokens. Trailing spaces of the context
    are scored with the continuation (how lm-eval splits a pair, so both see the same tokens)."""
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer(stripped + continuation)["input_ids"]
    n_context = len(tokenizer(stripped)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(whole[n_context:])
    return logprobs[torch.arange(n_context - 1, len(whole) - 1), targets].sum().item()


def test_tiny_kobest_files_are_kobest_shaped_and_deterministic(tmp_path: Path) -> None:
    kobest.write(tmp_path / "a")
    kobest.write(tmp_path / "b")
    fields = {
        "boolq": {"paragraph", "question", "label"},
        "copa": {"premise", "question", "alternative_1", "alternative_2", "label"},
        "hellaswag": {"context", "ending_1", "ending_2", "ending_3", "ending_4", "label"},
    }
    for subset, expected in fields.items():
        for split, size in (("test", kobest.TEST_SIZE), ("train", kobest.TRAIN_SIZE)):
            name = f"{subset}.{split}.jsonl"
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
            rows = [json.loads(line) for line in (tmp_path / "a" / name).read_text().splitlines()]
            assert len(rows) == size
            assert all(set(row) == expected for row in rows)
            labels = {row["label"] for row in rows}
            assert labels == set(range(4 if subset == "hellaswag" else 2)), (subset, labels)
    # lm-eval's view of the task: KoBEST's prompt through `include:`, local json data, no hub metric script.
    config = load_yaml(tmp_path / "a" / "tiny_kobest_copa.yaml", resolve_func=False)
    assert config["task"] == "tiny_kobest_copa" and config["output_type"] == "multiple_choice"
    assert config["doc_to_text"].endswith("kobest/utils.copa_doc_to_text")
    assert config["dataset_path"] == "json"
    assert Path(config["dataset_kwargs"]["data_files"]["test"]) == tmp_path / "a" / "copa.test.jsonl"
    assert not any(metric.get("hf_evaluate") for metric in config["metric_list"])


def test_lm_eval_scores_equal_a_hand_computation(
    job: JobConfig, bench: BenchmarkConfig, adapter_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    tokenizer = load_tokenizer(job.model)
    base = load_base_model(job.model, job.quantization)
    base_run = run_benchmarks(base, tokenizer, bench, tmp_path, "base")
    assert "loglikelihood requests" not in capfd.readouterr().err  # no terminal here: no request bars
    del base
    base = load_base_model(job.model, job.quantization, quantized=True)
    tuned = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()
    tuned_run = run_benchmarks(tuned, tokenizer, bench, tmp_path, "tuned")

    results = json.loads(Path(tuned_run.results_file).read_text())
    assert set(results["results"]) == set(bench.tasks)
    samples = [json.loads(line) for line in Path(tuned_run.samples_file).read_text().splitlines()]
    base_samples = [json.loads(line) for line in Path(base_run.samples_file).read_text().splitlines()]
    for task in bench.tasks:
        rows = [s for s in samples if s["task"] == task]
        assert len(rows) == LIMIT
        hand_acc = []
        for row in rows:
            context, choices = kobest_request(task, row["doc"])
            by_hand = [loglikelihood(tuned, tokenizer, context, f" {choice}") for choice in choices]
            by_lm_eval = [resp[0][0] for resp in row["resps"]]
            assert by_hand == pytest.approx(by_lm_eval, abs=5e-4), (task, row["doc_id"])
            prediction = max(range(len(choices)), key=lambda i: by_hand[i])
            assert row["acc"] == float(prediction == row["doc"]["label"]), (task, row["doc_id"])
            hand_acc.append(prediction == row["doc"]["label"])
            if "acc_norm" in row:  # normalised by the choice's length in characters, as lm-eval defines it
                normed = [ll / len(c) for ll, c in zip(by_hand, choices, strict=True)]
                best = max(range(len(choices)), key=lambda i: normed[i])
                assert row["acc_norm"] == float(best == row["doc"]["label"])
        assert tuned_run.metrics[f"{task}/acc"] == pytest.approx(sum(hand_acc) / LIMIT)
        assert f"{task}/acc_stderr" in tuned_run.metrics and f"{task}/f1" in tuned_run.metrics
    # The adapter is really applied: its log-likelihoods differ from the base's on the same requests.
    assert [s["resps"] for s in samples] != [s["resps"] for s in base_samples]
    assert set(base_run.metrics) == set(tuned_run.metrics)


def test_bad_task_name_fails_validation_with_the_field(job: JobConfig) -> None:
    validate_tasks(job.eval.benchmarks)
    bad = job.eval.benchmarks.model_copy(update={"tasks": ["tiny_kobest_boolq", "tiny_kobest_bolq"]})
    with pytest.raises(ConfigError) as error:
        validate_tasks(bad)
    message = str(error.value)
    assert "eval.benchmarks.tasks[1]" in message and "'tiny_kobest_bolq'" in message
    assert "tiny_kobest_boolq" in message.split("did you mean", 1)[1]
    assert "tasks[0]" not in message


def test_hub_kobest_names_validate_and_a_missing_include_path_is_named() -> None:
    qwen = load_config(REPO / "configs" / "qwen-ko.yaml")
    assert {"kobest_boolq", "kobest_copa", "kobest_wic"} <= set(qwen.eval.benchmarks.tasks)
    validate_tasks(qwen.eval.benchmarks)
    with pytest.raises(ConfigError, match=r"eval\.benchmarks\.include_path"):
        validate_tasks(BenchmarkConfig(tasks=["kobest_copa"], include_path="/nonexistent/tasks"))
    with pytest.raises(ConfigError, match=r"eval\.benchmarks\.include_path"):
        resolve_include_path("embedded:nope")


def test_flatten_results_names_and_drops_missing_stderr() -> None:
    flat = flatten_results(
        {
            "results": {
                "tiny_kobest_copa": {
                    "alias": "tiny_kobest_copa",
                    "acc,none": 0.5,
                    "acc_stderr,none": 0.1,
                    "f1,none": 0.4,
                    "f1_stderr,none": "N/A",
                },
                "gsm8k": {"exact_match,strict-match": 0.25},
            }
        }
    )
    assert flat == {
        "tiny_kobest_copa/acc": 0.5,
        "tiny_kobest_copa/acc_stderr": 0.1,
        "tiny_kobest_copa/f1": 0.4,
        "gsm8k/exact_match:strict-match": 0.25,
    }


def test_comparison_artifacts(tmp_path: Path) -> None:
    metrics = {
        "base/perplexity": 71.3,
        "tuned/perplexity": 7.8,
        "base/tiny_kobest_copa/acc": 0.5,
        "base/tiny_kobest_copa/acc_stderr": 0.06,
        "tuned/tiny_kobest_copa/acc": 0.6,
        "tuned/tiny_kobest_copa/acc_stderr": 0.05,
    }
    table, chart = write_comparison(metrics, tmp_path)
    lines = table.read_text().splitlines()
    assert lines[2:] == [
        "| perplexity | 71.3000 | 7.8000 | -63.5000 |",
        "| tiny_kobest_copa/acc | 0.5000 ± 0.0600 | 0.6000 ± 0.0500 | +0.1000 |",
    ]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
