"""merge: the merged model, reloaded from disk, computes what base + adapter computes; a bound it cannot meet
fails the step and leaves no merged model behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraflow.config.model import ModelConfig
from loraflow.config.serving import MergeConfig
from loraflow.tiny.base import tiny_ko_dir
from loraflow.training.merge import CHECK_CONVERSATIONS, MergeMismatch, merge_adapter, saved_mismatches
from tests.fixtures import ALL_LINEAR, make_adapter

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
