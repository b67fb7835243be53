"""The GPU preference job on a machine without a GPU, as tests/test_qwen_ko.py does for qwen-ko: every argument the
qwen-ko-dpo config builds for CUDA (DPOConfig, the adapter it trains, 4-bit loading, the data mapping, the gate,
the plan's memory) is built here by the same code and asserted, without loading a weight. Only the GPU's compute
capability is patched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from trl import DPOConfig

from loraflow.config import JobConfig, load_config
from loraflow.registry.parent import check_shape
from loraflow.registry.promote import judge
from loraflow.training import arguments
from loraflow.training.arguments import dpo_arguments, peft_config
from loraflow.training.models import from_pretrained_kwargs
from loraflow.training.plan import plan_job
from loraflow.training.plan_memory import GIB, activation_bytes, fused_head_bytes, layer_bytes


@pytest.fixture
def qwen_dpo() -> JobConfig:
    return load_config("configs/qwen-ko-dpo.yaml")


@pytest.fixture
def bf16_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))  # an A100


def test_dpo_arguments_on_a_bf16_gpu(qwen_dpo: JobConfig, bf16_gpu: None, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arguments, "on_terminal", lambda: False)  # a worker's log: train.py's ProgressLog, no bars
    args = dpo_arguments(qwen_dpo.training, qwen_dpo.model, tmp_path)
    assert args == {
        "output_dir": str(tmp_path), "num_train_epochs": 1.0, "max_steps": -1, "learning_rate": 5e-6,
        "lr_scheduler_type": "cosine", "warmup_steps": 0.1, "weight_decay": 0.0, "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 8, "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False}, "optim": "paged_adamw_8bit", "logging_steps": 10,
        "save_strategy": "steps", "save_steps": 200, "save_total_limit": 3, "seed": 42, "data_seed": 42,
        "report_to": "none", "use_cpu": False, "bf16": True, "fp16": False, "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False, "disable_tqdm": True,
        # DPO's own: beta, the paper's sigmoid loss, pairs already cut to max_length by format_chat, padded batches
        # (TRL 1.16 has no padding-free DPO), the reference computed beside the policy, dropout off for both.
        "beta": 0.1, "loss_type": ["sigmoid"], "max_length": None, "padding_free": False,
        "precompute_ref_log_probs": False, "disable_dropout": True,
    }
    # DPOConfig validates the rest (it refuses mixed precision where no GPU exists) and none of its own defaults
    # (learning rate 1e-6, bf16 on) survives what the job says.
    config = DPOConfig(**{**args, "bf16": False, "use_cpu": True})
    assert (config.learning_rate, config.beta, config.loss_type, config.max_length) == (5e-6, 0.1, ["sigmoid"], None)
    assert config.optim == "paged_adamw_8bit" and config.gradient_checkpointing and not config.padding_free


def test_dpo_arguments_on_a_t4_use_fp16(qwen_dpo: JobConfig, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    args = dpo_arguments(qwen_dpo.training, qwen_dpo.model, tmp_path)
    assert (args["bf16"], args["fp16"]) == (False, True)


def test_the_adapter_it_trains_is_qwen_ko_champions_shape(qwen_dpo: JobConfig, tmp_path: Path) -> None:
    """With init_from, PEFT loads the champion's own adapter_config.json; the pre-flight refuses a `lora` that does not
    describe it, so `lora` (what the plan, the keys and the run's params read) is qwen-ko's."""
    qwen = load_config("configs/qwen-ko.yaml")
    assert qwen_dpo.lora == qwen.lora and qwen_dpo.training.init_from == "qwen-ko@champion"
    lora = peft_config(qwen_dpo.lora)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.bias, lora.task_type) == (16, 32, 0.05, "none",
                                                                                       "CAUSAL_LM")
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    champion = peft_config(qwen.lora).to_dict()  # what qwen-ko's training saves
    champion["target_modules"] = sorted(champion["target_modules"])
    (tmp_path / "adapter_config.json").write_text(json.dumps(champion))
    check_shape(qwen_dpo, "qwen-ko@champion", "qwen-ko/3", tmp_path)  # raises when they differ


def test_it_loads_the_4bit_base_with_sdpa_for_padded_pairs(qwen_dpo: JobConfig, bf16_gpu: None) -> None:
    assert qwen_dpo.training.padding_free and not qwen_dpo.training.padding_free_batches
    kwargs = from_pretrained_kwargs(qwen_dpo.model, qwen_dpo.quantization,
                                    padding_free=qwen_dpo.training.padding_free_batches)
    bnb = kwargs.pop("quantization_config")
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert kwargs == {"revision": "main", "dtype": torch.bfloat16, "device_map": {"": 0}, "attn_implementation": "sdpa",
                      "trust_remote_code": False}


def test_the_data_and_the_gate(qwen_dpo: JobConfig) -> None:
    [source] = qwen_dpo.data.sources
    assert (source.hub_id, source.revision, source.split) == ("SJ-Donald/orca-dpo-pairs-ko", "main", "train")
    assert source.fields.is_pair and source.fields.columns() == ["question", "chosen", "rejected"]
    assert source.fields.system == "system"
    assert (qwen_dpo.data.eval_fraction, qwen_dpo.data.eval_max_rows) == (0.02, 500)
    assert not qwen_dpo.eval.heldout.enabled and qwen_dpo.registry.model_name == "qwen-ko-dpo"
    tasks = ("kobest_boolq/acc", "kobest_copa/acc", "kobest_hellaswag/acc_norm", "kobest_sentineg/acc",
             "kobest_wic/acc")
    start = {f"start/{t}": 0.7 for t in tasks} | {f"base/{t}": 0.7 for t in tasks}
    metrics = start | {f"tuned/{t}": 0.69 for t in tasks} | {f"{side}/{t}_stderr": 0.013
                                                             for side in ("start", "tuned") for t in tasks}
    metrics |= {"start/preference_accuracy": 0.62, "tuned/preference_accuracy": 0.71}
    passed, reasons = judge(qwen_dpo.promotion, metrics, None)
    assert passed, reasons  # one point below the start on every task: within one s.e. of the difference (0.018)
    passed, reasons = judge(qwen_dpo.promotion, metrics | {"tuned/preference_accuracy": 0.6}, None)
    assert not passed and any(r.startswith("fail: preference_accuracy 0.6 vs start 0.62") for r in reasons)


def test_plan_counts_both_sequences_of_each_pair_and_the_reference(qwen_dpo: JobConfig) -> None:
    dpo = plan_job(qwen_dpo)  # Qwen2.5-7B's config.json: the hub cache's, else the shipped copy (the same file)
    fresh = plan_job(qwen_dpo.model_copy(update={"training": qwen_dpo.training.model_copy(update={"init_from": None})}))
    assert (dpo.method, dpo.batch_size, dpo.sequences_per_batch, dpo.max_length) == ("dpo", 2, 4, 2048)
    layers, hidden, heads, vocab = 28, 3584, 28, 152064
    kept, _ = activation_bytes(4, 2048, hidden, layers, heads, vocab, True)
    qlora = dpo.memory_gib["qlora_nf4"]
    # the policy keeps 4 sequences' activations, the reference's no-grad forward one layer more, TRL's fused head
    # a tile, not the 4 x 2048 x 152k logits (4.6 GiB); LoRA's own activations and one dequantized layer on top
    floor = (kept + layer_bytes(4, 2048, hidden, heads) + fused_head_bytes(4 * 2048, vocab)) / GIB
    assert floor < qlora["activations"] < floor + 2.0
    # the starting adapter's frozen copy: 40M fp32 parameters
    assert qlora["weights"] - fresh.memory_gib["qlora_nf4"]["weights"] == pytest.approx(
        4 * dpo.trainable_params / GIB, abs=2e-3)
    assert "qlora_nf4" in dpo.fits["A100 80 GB"]
