"""merge: fold the adapter into a full-precision reload of the base (`merge_and_unload`) and prove the merged
model computes what base + adapter computes before anyone serves it.

Never merge into the 4-bit training base: bitsandbytes rounds the merged weights back to 4-bit, and on
AVX512-BF16 CPUs the repacked weights give garbage.
"""

from __future__ import annotations

import gc
import logging
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from loraflow.config.lora import QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.config.serving import MergeConfig
from loraflow.results import MergeResult
from loraflow.training.models import device_for, dtype_for, load_base_model

log = logging.getLogger(__name__)

# Rendered with the adapter's own chat template: the logits check covers the prompts serving will see.
CHECK_CONVERSATIONS = (
    [{"role": "user", "content": "대한민국 헌법 제1조는 무엇입니까?"}],
    [{"role": "user", "content": "국민의 권리와 의무를 요약해 주세요."}],
    [{"role": "system", "content": "짧게 답하세요."}, {"role": "user", "content": "국회는 무엇을 합니까?"}],
)


class MergeMismatch(RuntimeError):
    """The merged model's logits differ from base + adapter by more than `merge.max_abs_logit_diff`."""


def _full_precision(model: ModelConfig, merge: MergeConfig) -> ModelConfig:
    return model if merge.dtype == "auto" else model.model_copy(update={"dtype": merge.dtype})


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits.float().cpu()


def max_logit_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def merge_adapter(
    adapter_dir: str | Path, adapter_sha: str, model: ModelConfig, merge: MergeConfig, out_dir: Path
) -> MergeResult:
    """Write `out_dir/merged/` and return its result; raises MergeMismatch (keeping nothing) when the reloaded
    merged model's logits leave the bound."""
    full = _full_precision(model, merge)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))  # carries the template the adapter trained with
    device = device_for(full)
    prompts = [
        tokenizer.apply_chat_template(
            c, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        for c in CHECK_CONVERSATIONS
    ]
    batches = [{k: v.to(device) for k, v in p.items() if k in ("input_ids", "attention_mask")} for p in prompts]

    base = load_base_model(full, QuantizationConfig(method="none"), quantized=False)
    tuned = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()
    reference = [_logits(tuned, b) for b in batches]
    merged: PreTrainedModel = tuned.merge_and_unload()
    merged_dir = out_dir / "merged"
    merged.save_pretrained(str(merged_dir))
    tokenizer.save_pretrained(str(merged_dir))
    del tuned, merged, base
    gc.collect()

    # Check what was written, not the object in memory: a save that loses the merge (tied weights) fails.
    reloaded = (
        AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=dtype_for(full.dtype, device)).to(device).eval()
    )
    diff = max_logit_diff(reference, [_logits(reloaded, b) for b in batches])
    del reloaded
    log.info(
        "merged %s: max |logit diff| vs base+adapter = %.3g (bound %.3g)",
        adapter_dir,
        diff,
        merge.max_abs_logit_diff,
    )
    if diff > merge.max_abs_logit_diff:
        shutil.rmtree(merged_dir)
        raise MergeMismatch(
            f"merged logits differ from base+adapter by {diff:.3g} > merge.max_abs_logit_diff "
            f"{merge.max_abs_logit_diff:.3g}"
        )
    return MergeResult(
        key=out_dir.name,
        path=str(out_dir),
        adapter_sha=adapter_sha,
        dtype=str(dtype_for(full.dtype, device)).removeprefix("torch."),
        max_abs_logit_diff=diff,
    )
