"""The task's own metric, in pieces: templates and label names in the data step, the label-set scores, the gate's
absolute bound, `all-linear` and the banking77 plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraflow.config import load_config
from loraflow.config.data import DataConfig
from loraflow.config.lora import ALL_LINEAR, LoraSettings
from loraflow.config.promotion import PromotionConfig
from loraflow.data.build_dataset import DatasetError, build_dataset
from loraflow.evaluation.labels import OTHER, label_metrics
from loraflow.registry.promote import judge
from loraflow.training.plan import plan_job


def _csv(tmp_path: Path) -> Path:
    path = tmp_path / "x.csv"
    path.write_text("text,label\n카드가 안 와요,0\n환율 알려 주세요,1\n비밀번호 변경,2\n", encoding="utf-8")
    return path


def test_template_naming_a_missing_column_fails_at_once(tmp_path: Path) -> None:
    path = _csv(tmp_path)
    data = DataConfig(sources=[{"path": str(path), "fields": {"prompt_template": "의도: {question}",
                                                              "response_template": "{label}"}}])
    with pytest.raises(DatasetError) as error:
        build_dataset(data, tmp_path, "k")
    assert str(error.value) == (f"data.sources[0].fields.prompt_template names column 'question', which {path} "
                                "does not have (columns: text, label)")


def test_templates_and_label_names_make_chats_and_record_the_label_set(tmp_path: Path) -> None:
    from datasets import load_from_disk

    names = ["arrival", "rate", "pin"]
    data = DataConfig(sources=[{"path": str(_csv(tmp_path)), "fields": {
        "prompt_template": "의도: {text}", "response_template": "{label}", "label_names": names}}], eval_fraction=0.3)
    result = build_dataset(data, tmp_path, "k")
    assert result.stats["labels"] == {"label": names}
    splits = load_from_disk(result.dataset_dir)
    chats = {tuple((m["role"], m["content"]) for m in row["messages"]) for name in splits for row in splits[name]}
    assert (("user", "의도: 카드가 안 와요"), ("assistant", "arrival")) in chats
    assert len(chats) == 3


def test_label_metrics_confusion_and_most_confused_pair(tmp_path: Path) -> None:
    labels = ["a", "b", "c"]
    pairs = [("a", "a"), ("a", "b"), ("a", "b"), ("b", "b"), ("c", "c"), ("c", " zzz ")]
    scores, files = label_metrics(pairs, labels, tmp_path, "tuned", top=2)
    assert scores["accuracy"] == pytest.approx(3 / 6)
    assert scores["other_answers"] == pytest.approx(1 / 6)
    # per class F1: a 2*1*(1/3)/(4/3)=0.5, b 2*(1/3)*1/(4/3)=0.5, c 2*1*0.5/1.5=2/3
    assert scores["macro_f1"] == pytest.approx((0.5 + 0.5 + 2 / 3) / 3)
    confusion = (tmp_path / "tuned.heldout_confusion.csv").read_text().splitlines()
    assert confusion[0] == f"reference \\ answered,a,b,c,{OTHER}"
    assert confusion[1:] == ["a,1,2,0,0", "b,0,1,0,0", "c,0,0,1,1"]
    pairs_md = (tmp_path / "tuned.heldout_confused_pairs.md").read_text()
    assert "| a | b | 2 |" in pairs_md and f"| c | {OTHER} | 1 |" in pairs_md
    assert {Path(f).name for f in files} >= {"tuned.heldout_confusion.png", "tuned.heldout_per_class.csv"}


def test_gate_bounds_the_tuned_score_absolutely() -> None:
    policy = PromotionConfig(max_perplexity_regression=None, require=[
        {"metric": "heldout/accuracy", "min_value": 0.9, "min_gain_over_base": 0.0}])
    passed, reasons = judge(policy, {"base/heldout/accuracy": 0.1, "tuned/heldout/accuracy": 0.89}, None)
    assert not passed and "fail: heldout/accuracy 0.89 >= 0.9" in reasons
    passed, _ = judge(policy, {"base/heldout/accuracy": 0.1, "tuned/heldout/accuracy": 0.9}, None)
    assert passed


def test_all_linear_is_peft_shorthand_and_plans_like_the_seven_projections() -> None:
    assert LoraSettings(target_modules="all-linear").peft_targets == "all-linear"
    job = load_config("configs/banking77-qwen1.5b.yaml")
    explicit = plan_job(job)
    shorthand = plan_job(load_config("configs/banking77-qwen1.5b.yaml", {"lora.target_modules": "all-linear"}))
    # The seed's Qwen2.5-1.5B-Instruct, r=16 on the seven projections (tied embeddings: one 151936 x 1536 table).
    assert (explicit.trainable_params, explicit.total_params) == (18_464_768, 1_562_179_072)
    assert shorthand.trainable_params == explicit.trainable_params
    assert shorthand.target_modules == list(ALL_LINEAR)
