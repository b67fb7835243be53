"""merge: fold the adapter into a full-precision reload of the base (`merge_and_unload`) and prove the merged
model computes what base + adapter computes before anyone serves it.

The flow merges only a version its promote step made champion (`merge_registered`); `loraflow merge CONFIG
--version N` merges a version a person promotes later (`merge_version`): both through the same step directory and
the same upload to the version's run.

Never merge into the 4-bit training base: bitsandbytes rounds the merged weights back to 4-bit, and on
AVX512-BF16 CPUs the repacked weights give garbage.
"""

from __future__ import annotations

import gc
import logging
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedModel

from loraflow.config.job import JobConfig
from loraflow.config.lora import QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.config.serving import MergeConfig
from loraflow.errors import InputError
from loraflow.outputs import run_step
from loraflow.registry.client import client_for, tracking_uri
from loraflow.registry.download import download_version
from loraflow.registry.register import attach_directory
from loraflow.results import MergeResult
from loraflow.training.device import released_device_memory
from loraflow.training.keys import merge_key
from loraflow.training.models import device_for, dtype_for, load_base_model

log = logging.getLogger(__name__)

# Rendered with the adapter's own chat template: the logits check covers the prompts serving will see.
CHECK_CONVERSATIONS = (
    [{"role": "user", "content": "대한민국 헌법 제1조는 무엇입니까?"}],
    [{"role": "user", "content": "국민의 권리와 의무를 요약해 주세요."}],
    [{"role": "system", "content": "짧게 답하세요."}, {"role": "user", "content": "국회는 무엇을 합니까?"}],
)


class MergeMismatch(RuntimeError):
    """The merged model's logits differ from base + adapter by more than `merge.max_abs_logit_diff`, or the saved
    files do not reproduce the merged model."""


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits.float().cpu()


def max_logit_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def merge_adapter(
    adapter_dir: str | Path, adapter_sha: str, model: ModelConfig, merge: MergeConfig, out_dir: Path
) -> MergeResult:
    """Write `out_dir/merged/` and return its result; raises MergeMismatch (keeping nothing) when a check fails.

    The merge and its check run in fp32, where merged == base + adapter up to summation order (1e-3 bound): in bf16
    both sides round every matmul and differ by ~0.02 on a 4-layer toy already, so a bound loose enough for that could
    not tell a lost adapter from rounding. The merged weights are then cast to the serving dtype and saved, and every
    tensor in the written files must equal the merged weight cast to that dtype, bit for bit.
    """
    device = device_for(model) if merge.device == "auto" else merge.device
    compute = model.model_copy(update={"dtype": "float32", "device": device})
    save_dtype = dtype_for(model.dtype if merge.dtype == "auto" else merge.dtype, device_for(model))
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))  # carries the template the adapter trained with
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt") for c in CHECK_CONVERSATIONS]
    batches = [{k: v.to(device) for k, v in p.items() if k in ("input_ids", "attention_mask")} for p in prompts]

    base = load_base_model(compute, QuantizationConfig(method="none"), quantized=False)
    tuned = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()
    reference = [_logits(tuned, b) for b in batches]
    merged: PreTrainedModel = tuned.merge_and_unload()
    diff = max_logit_diff(reference, [_logits(merged, b) for b in batches])
    log.info("merged %s: max |logit diff| vs base+adapter (fp32) = %.3g (bound %.3g)", adapter_dir, diff,
             merge.max_abs_logit_diff)
    if diff > merge.max_abs_logit_diff:
        raise MergeMismatch(f"merged logits differ from base+adapter by {diff:.3g} > merge.max_abs_logit_diff "
                            f"{merge.max_abs_logit_diff:.3g}")
    merged = merged.to(save_dtype)
    merged_dir = out_dir / "merged"
    # Shards of at most `max_shard_size` plus an index: transformers 5 would otherwise write one 50 GB-shard file.
    merged.save_pretrained(str(merged_dir), max_shard_size=merge.max_shard_size)
    tokenizer.save_pretrained(str(merged_dir))
    # Check what was written, not the object in memory: a save that loses the merge (tied weights) fails.
    mismatched = saved_mismatches(merged, merged_dir)
    del tuned, merged, base
    gc.collect()
    if mismatched:
        shutil.rmtree(merged_dir)
        raise MergeMismatch(f"the saved merged model differs from the merged weights in {mismatched[:5]}")
    return MergeResult(key=out_dir.name, path=str(out_dir), adapter_sha=adapter_sha,
                       dtype=str(save_dtype).removeprefix("torch."), max_abs_logit_diff=diff)


def saved_mismatches(model: torch.nn.Module, saved_dir: Path) -> list[str]:
    """Names of the model's tensors that the saved safetensors files miss or hold with other values (one tensor in
    memory at a time). A tensor tied to one checked already (lm_head = embeddings) is not saved twice."""
    where: dict[str, Path] = {}
    for file in sorted(saved_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    seen: set[int] = set()
    bad = []
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        if name not in where:
            bad.append(f"{name} (missing)")
            continue
        with safe_open(str(where[name]), framework="pt") as handle:
            if not torch.equal(handle.get_tensor(name), tensor.detach().cpu()):
                bad.append(name)
    return bad


def merge_registered(job: JobConfig, adapter_dir: str | Path, adapter_sha: str, run_id: str,
                     slot: Callable[[], AbstractContextManager[object]] = nullcontext) -> MergeResult:
    """Merge (once per adapter and merge settings: the step directory is content-addressed) and attach `merged/`
    to the version's run. `slot` is held around the merge itself only when it runs on a GPU (the flow's
    accelerator limit); the model's memory is handed back before the slot."""
    on_gpu = (job.merge.device if job.merge.device != "auto" else job.model.device) != "cpu"

    def produce(out_dir: Path) -> MergeResult:
        with slot() if on_gpu else nullcontext(), released_device_memory():
            return merge_adapter(adapter_dir, adapter_sha, job.model, job.merge, out_dir)

    result = run_step("merge", merge_key(adapter_sha, job.model, job.merge), MergeResult, produce)
    attach_directory(job.registry, run_id, result.merged_dir, "merged")
    return result


def merge_version(job: JobConfig, version: str, downloads: Path) -> MergeResult:
    """`loraflow merge CONFIG --version N`: the registered version's adapter (downloaded under `downloads`) merged
    and attached to its run, as the flow does for a champion."""
    client = client_for(job.registry)
    registered = client.get_model_version(job.registry.model_name, str(version))
    adapter_sha = registered.tags.get("adapter_sha")
    if not adapter_sha or not registered.run_id:
        raise InputError(f"{job.registry.model_name} version {version} has no adapter_sha tag or run: it was not "
                         "registered by loraflow")
    adapter_dir = download_version(registered, downloads, tracking_uri(job.registry))
    return merge_registered(job, adapter_dir, adapter_sha, registered.run_id)
