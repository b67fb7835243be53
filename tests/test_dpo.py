"""DPO from a registered version, piece by piece on a real MLflow registry (SQLite) and the tiny-ko base: the
pre-flight pins `training.init_from` once (a missing version fails there, naming it, before any work), keys follow
the pinned version and never a moved alias, preference accuracy and margin are DPO's own log-probabilities, the gate
compares with the starting point, `loraflow versions` shows the parent."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from loraflow import paths
from loraflow.config import load_config
from loraflow.config.promotion import PromotionConfig, Requirement
from loraflow.errors import InputError
from loraflow.evaluation.comparison import comparison_table
from loraflow.evaluation.preference import preference_scores
from loraflow.registry.parent import LINEAGE_TAG, PARENT_TAG, parent_tags, pin_parent
from loraflow.registry.promote import judge
from loraflow.registry.rollback import describe_versions
from loraflow.results import ChatResult
from loraflow.training.keys import train_key
from tasks.validate import validated_job
from tests.fixtures import ALL_LINEAR, RegistryFixture, make_adapter, make_registry

DPO_CONFIG = "configs/tiny-ko-dpo.yaml"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_base_dir: Path) -> RegistryFixture:
    """`tiny-ko` v1 and v2 (tiny-ko-dpo's adapter shape), v3 of another shape; champion on v1."""
    root = tmp_path_factory.mktemp("parents")
    registry = make_registry(root, "tiny-ko")
    for seed, r in ((1, 16), (2, 16), (3, 8)):
        adapter = make_adapter(tiny_base_dir, root / f"a{seed}", r=r, targets=list(ALL_LINEAR), seed=seed)
        registry.register(adapter)
    registry.set_alias("champion", "1")
    return registry


def dpo_job(registry: RegistryFixture, **overrides):
    return load_config(DPO_CONFIG, {"registry.tracking_uri": registry.tracking_uri, **overrides})


def test_init_from_naming_a_missing_version_fails_in_the_pre_flight(registry: RegistryFixture) -> None:
    before = sorted(paths.work_dir().rglob("*"))  # no step may run, nor write, for a run that cannot start
    for reference, missing in (("tiny-ko@nope", "no alias 'nope'"), ("tiny-ko/9", "no version 9"),
                               ("other@champion", "model 'other'")):
        with pytest.raises(InputError, match=rf"^training\.init_from: '{reference}': the registry at .* {missing}"):
            validated_job(DPO_CONFIG, {"registry.tracking_uri": registry.tracking_uri,
                                       "training.init_from": reference})
    assert sorted(paths.work_dir().rglob("*")) == before
    with pytest.raises(InputError, match=r"^lora: training\.init_from 'tiny-ko/3' .* is an adapter of r=8"):
        validated_job(DPO_CONFIG, {"registry.tracking_uri": registry.tracking_uri, "training.init_from": "tiny-ko/3"})


def test_an_alias_is_pinned_once_and_the_keys_follow_the_version_it_named(registry: RegistryFixture) -> None:
    job = dpo_job(registry)
    _, _, parent = validated_job(DPO_CONFIG, {"registry.tracking_uri": registry.tracking_uri})
    assert parent is not None and (parent.name, parent.requested, parent.lineage) == (
        "tiny-ko/1", "tiny-ko@champion", "tiny-ko/1")
    assert (Path(parent.adapter_dir) / "adapter_model.safetensors").is_file()
    chat = ChatResult(key="chat", path="unused", dataset_sha="d", template_sha="t", stats={})

    def key(pinned) -> str:
        return train_key(chat, job.model, job.lora, job.quantization, job.training, pinned)

    pinned_key = key(parent)
    registry.set_alias("champion", "2")  # moved after the pre-flight: this run still trains from v1
    try:
        assert key(parent) == pinned_key
        moved = pin_parent(job)  # the next run's pre-flight
        assert moved.name == "tiny-ko/2" and moved.adapter_sha != parent.adapter_sha
        assert key(moved) != pinned_key
        assert key(moved.model_copy(update={"adapter_dir": "/elsewhere"})) == key(moved)  # content, not location
        # A version trained from a version: its lineage names the whole chain.
        client = registry.client()
        for name, value in parent_tags(moved).items():
            client.set_model_version_tag("tiny-ko", "1", name, value)
        grandchild = pin_parent(dpo_job(registry, **{"training.init_from": "tiny-ko/1"}))
        assert grandchild.lineage == "tiny-ko/1 <- tiny-ko/2"
        assert any(line.startswith("v1\t") and line.endswith("\tparent=tiny-ko/2")
                   for line in describe_versions(client, "tiny-ko"))
        for name in (PARENT_TAG, LINEAGE_TAG):
            client.delete_model_version_tag("tiny-ko", "1", name)
    finally:
        registry.set_alias("champion", "1")


def test_a_version_of_another_base_is_refused(registry: RegistryFixture) -> None:
    client = registry.client()
    client.set_model_version_tag("tiny-ko", "2", "base_model", "Qwen/Qwen2.5-7B-Instruct")
    try:
        with pytest.raises(InputError, match=r"tiny-ko/2\) is an adapter of Qwen/Qwen2\.5-7B-Instruct; this job's "
                                             r"model\.base is embedded:tiny-ko"):
            pin_parent(dpo_job(registry, **{"training.init_from": "tiny-ko/2"}))
    finally:
        client.set_model_version_tag("tiny-ko", "2", "base_model", "embedded:tiny-ko")


def test_preference_scores_are_the_summed_log_probabilities_of_each_answer(tiny_base_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(4, 500, (n,), generator=generator).tolist()

    pairs = [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}
             for p, c, r in ((9, 4, 6), (3, 7, 2), (12, 5, 5), (6, 1, 8), (4, 4, 4))]

    def logp(prompt: list[int], answer: list[int]) -> float:  # by hand: one sequence at a time, no padding
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0].float().log_softmax(-1)
        return sum(logits[len(prompt) + i - 1, token].item() for i, token in enumerate(answer))

    margins = [logp(p["prompt_ids"], p["chosen_ids"]) - logp(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    scores = preference_scores(model, Dataset.from_list(pairs), pad_id=3, batch_size=2)
    assert scores["preference_accuracy"] == sum(m > 0 for m in margins) / len(margins)
    assert math.isclose(scores["preference_margin"], sum(margins) / len(margins), rel_tol=1e-4)
    assert scores["preference_accuracy_stderr"] > 0 and scores["preference_margin_stderr"] > 0


def test_the_gate_compares_with_the_starting_point_within_its_standard_error() -> None:
    policy = PromotionConfig(max_perplexity_regression=None, require=[
        Requirement(metric="preference_accuracy", min_gain_over_base=None, min_gain_over_start=0.0),
        Requirement(metric="kobest_copa/acc", min_gain_over_base=None, min_gain_over_start=0.0,
                    stderr_tolerance=1.0, min_gain_over_champion=None)])
    metrics = {"start/preference_accuracy": 0.2, "tuned/preference_accuracy": 0.8, "start/kobest_copa/acc": 0.70,
               "start/kobest_copa/acc_stderr": 0.02, "tuned/kobest_copa/acc": 0.68,
               "tuned/kobest_copa/acc_stderr": 0.02, "base/kobest_copa/acc": 0.9}
    passed, reasons = judge(policy, metrics, {"tuned/preference_accuracy": 0.8})
    assert passed, reasons
    assert any(r.startswith("pass: preference_accuracy 0.8 vs start 0.2") for r in reasons)
    assert any(r.startswith("pass: kobest_copa/acc 0.68 vs start 0.7") for r in reasons)  # 1 s.e. of the difference
    passed, reasons = judge(policy, {**metrics, "tuned/kobest_copa/acc": 0.65}, None)
    assert not passed and any(r.startswith("fail: kobest_copa/acc 0.65 vs start 0.7") for r in reasons)
    without_start = {k: v for k, v in metrics.items() if not k.startswith("start/")}
    assert "fail: start/preference_accuracy was not measured" in judge(policy, without_start, None)[1]
    table = comparison_table(metrics)
    assert table.splitlines()[0] == "| metric | base | start | tuned | tuned − start |"
    assert "| preference_accuracy |  | 0.2000 | 0.8000 | +0.6000 |" in table
