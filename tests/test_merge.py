"""merge: the merged model, reloaded from disk, computes what base + adapter computes; a bound it cannot meet
fails the step and leaves no merged model behind. Saved in shards; run by the flow's task only for a version its
promotion made champion, and by `loraflow merge CONFIG --version N` for one promoted later; the models are gone
from memory once the step has returned."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from prefect import flow
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from loraflow import paths
from loraflow.cli import main
from loraflow.config.job import JobConfig
from loraflow.config.model import ModelConfig
from loraflow.config.serving import MergeConfig
from loraflow.hashing import sha_of_files
from loraflow.registry.client import client_at
from loraflow.registry.promote import PromotionDecision
from loraflow.results import MergeResult, RegisteredVersion, TrainResult
from loraflow.tiny.base import tiny_ko_dir
from loraflow.training.device import released_device_memory
from loraflow.training.merge import CHECK_CONVERSATIONS, MergeMismatch, merge_adapter, saved_mismatches
from tasks.merge import merge
from tests.fixtures import ALL_LINEAR, make_adapter, make_registry

MODEL = ModelConfig(base="embedded:tiny-ko", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_ko_dir(), tmp_path_factory.mktemp("adapter") / "adapter", r=16, targets=ALL_LINEAR, seed=7)


def last_logits(model_dir: str, text_ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=text_ids).logits


def test_merged_model_matches_base_plus_adapter(adapter_dir: Path, tmp_path: Path) -> None:
    result = merge_adapter(adapter_dir, "sha-test", MODEL, MergeConfig(enabled=True), tmp_path / "m")
    assert 0 <= result.max_abs_logit_diff <= 1e-3
    assert result.dtype == "float32"
    merged = Path(result.merged_dir)
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(adapter_dir)).chat_template

    # The check is not vacuous: the merged weights really move the logits away from the base's.
    ids = tokenizer.apply_chat_template(
        CHECK_CONVERSATIONS[0], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    moved = (last_logits(str(merged), ids) - last_logits(str(tiny_ko_dir()), ids)).abs().max()
    assert moved > 100 * result.max_abs_logit_diff


def test_bound_it_cannot_meet_fails_and_keeps_nothing(adapter_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MergeMismatch, match="max_abs_logit_diff"):
        merge_adapter(
            adapter_dir,
            "sha-test",
            MODEL,
            MergeConfig(enabled=True, max_abs_logit_diff=1e-12),
            tmp_path / "m",
        )
    assert not (tmp_path / "m" / "merged").exists()


def test_a_bf16_merge_is_checked_in_fp32_and_saved_in_bf16(adapter_dir: Path, tmp_path: Path) -> None:
    """The qwen-ko path (bf16 serving dtype) on CPU: in bf16 both sides round every matmul, so merged vs
    base+adapter computed in bf16 exceeds a 1e-3 bound even for a correct merge; loraflow checks in fp32 instead."""
    result = merge_adapter(adapter_dir, "sha-test", MODEL, MergeConfig(enabled=True, dtype="bfloat16"),
                           tmp_path / "m")
    assert result.dtype == "bfloat16" and result.max_abs_logit_diff <= 1e-3
    saved = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert {p.dtype for p in saved.parameters()} == {torch.bfloat16}

    base = AutoModelForCausalLM.from_pretrained(str(tiny_ko_dir()), dtype=torch.bfloat16)
    tuned = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ids = AutoTokenizer.from_pretrained(str(adapter_dir)).apply_chat_template(
        CHECK_CONVERSATIONS[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        bf16_reference = tuned(input_ids=ids).logits.float()
        bf16_merged = saved.eval()(input_ids=ids).logits.float()
    assert (bf16_reference - bf16_merged).abs().max() > 1e-3  # what the old bf16-vs-bf16 check would have seen


def test_a_saved_file_that_differs_from_the_merge_is_caught(adapter_dir: Path, tmp_path: Path) -> None:
    result = merge_adapter(adapter_dir, "sha-test", MODEL, MergeConfig(enabled=True), tmp_path / "m")
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    file = Path(result.merged_dir) / "model.safetensors"
    weights = load_file(str(file))
    name = next(k for k in weights if "q_proj" in k)
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(file), metadata={"format": "pt"})
    assert saved_mismatches(merged, Path(result.merged_dir)) == [name]


def test_a_small_shard_size_writes_shards_and_an_index_that_reload_to_the_same_logits(adapter_dir: Path,
                                                                                      tmp_path: Path) -> None:
    """The tiny base is 3.7 MB in fp32: 1MB shards split it as 5 GB shards split a 15 GB bf16 7B."""
    result = merge_adapter(adapter_dir, "sha-test", MODEL, MergeConfig(enabled=True, max_shard_size="1MB"),
                           tmp_path / "m")
    merged = Path(result.merged_dir)
    shards = sorted(merged.glob("model-*.safetensors"))
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and not (merged / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    # A shard holds at most 1 MB of tensors, unless one tensor alone is larger (the 2 MB tied embedding)
    for shard in shards:
        names = [n for n, f in index["weight_map"].items() if f == shard.name]
        assert shard.stat().st_size < 1.1e6 or len(names) == 1, (shard.name, names)

    ids = AutoTokenizer.from_pretrained(str(adapter_dir)).apply_chat_template(
        CHECK_CONVERSATIONS[1], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_ko_dir()), dtype=torch.float32)
    with torch.no_grad():
        reference = PeftModel.from_pretrained(base, str(adapter_dir)).eval()(input_ids=ids).logits
    assert (last_logits(str(merged), ids) - reference).abs().max() <= 1e-3


def test_the_models_are_gone_once_the_step_returns(adapter_dir: Path, tmp_path: Path) -> None:
    """What `released_device_memory` around a step guarantees: every model the step ran (base, PEFT, merged) is
    collected when it returns, so its CUDA memory can be handed back before vLLM starts in the same process."""
    seen: list[weakref.ref] = []

    def remember(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, PreTrainedModel | PeftModel):
            seen.append(weakref.ref(module))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(remember)
    try:
        with released_device_memory():
            merge_adapter(adapter_dir, "sha-test", MODEL, MergeConfig(enabled=True), tmp_path / "m")
    finally:
        hook.remove()
    assert len(seen) >= 2 and [ref for ref in seen if ref() is not None] == []


@flow
def merge_flow(job: JobConfig, trained: TrainResult, version: RegisteredVersion,
               decision: PromotionDecision) -> MergeResult | None:
    return merge(job, trained, version, decision)


@pytest.fixture
def registered(tiny_job: JobConfig, adapter_dir: Path, tmp_path: Path) -> tuple[JobConfig, TrainResult,
                                                                                    RegisteredVersion]:
    """The adapter as the train step leaves it and registered as the register step does (`adapter_sha` tag)."""
    train_dir = tmp_path / "train"
    shutil.copytree(adapter_dir, train_dir / "adapter")
    sha = sha_of_files(sorted((train_dir / "adapter").glob("adapter_*")))
    registry = make_registry(tmp_path, "tiny-merge")
    number = registry.register(train_dir / "adapter")
    registry.client().set_model_version_tag("tiny-merge", number, "adapter_sha", sha)
    version = registry.client().get_model_version("tiny-merge", number)
    job = tiny_job.model_copy(update={
        "registry": tiny_job.registry.model_copy(update={"model_name": "tiny-merge",
                                                            "tracking_uri": registry.tracking_uri}),
        "merge": MergeConfig(enabled=True, max_shard_size="2MB")})
    trained = TrainResult(key="k", path=str(train_dir), adapter_sha=sha, metrics={})
    return job, trained, RegisteredVersion(model_name="tiny-merge", version=number, run_id=version.run_id,
                                           experiment_id=registry.experiment_id, source=version.source,
                                           tracking_uri=registry.tracking_uri, created=True)


def decision(number: str, alias: str | None) -> PromotionDecision:
    return PromotionDecision(model_name="tiny-merge", version=number, passed=alias is not None, alias=alias,
                             compared_with=None, reasons=[], decided_now=True)


@pytest.mark.slow  # the task runs in a Prefect flow (Prefect's temporary server)
def test_only_a_version_made_champion_is_merged_and_uploaded(registered) -> None:
    job, trained, version = registered
    client = client_at(job.registry.tracking_uri)
    for alias in (None, "challenger"):  # rejected, or waiting for a person
        assert merge_flow(job, trained, version, decision(version.version, alias)) is None
        assert client.list_artifacts(version.run_id, "merged") == []
    merged = merge_flow(job, trained, version, decision(version.version, "champion"))
    assert merged is not None and Path(merged.merged_dir, "model.safetensors.index.json").is_file()
    uploaded = {Path(a.path).name for a in client.list_artifacts(version.run_id, "merged")}
    assert {"model.safetensors.index.json", "model-00001-of-00002.safetensors", "config.json"} <= uploaded


def test_loraflow_merge_merges_a_version_promoted_later(registered, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    job, _, version = registered
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(job.model_dump(mode="json"), allow_unicode=True), encoding="utf-8")
    assert main(["merge", str(config), "--version", version.version]) == 0
    assert f"tiny-merge v{version.version}: merged into" in capsys.readouterr().out
    assert (paths.sub("merge-adapters", "tiny-merge") / f"v{version.version}" / "adapter_config.json").is_file()
    names = {Path(a.path).name for a in client_at(job.registry.tracking_uri).list_artifacts(version.run_id, "merged")}
    assert "model.safetensors.index.json" in names
