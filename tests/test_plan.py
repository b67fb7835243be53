"""`loraflow plan`: parameters, adapter size and memory per mode, computed offline on the meta device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub.constants
import pytest
from transformers import MistralConfig

from loraflow.config import JobConfig, load_config
from loraflow.config.lora import LoraSettings
from loraflow.training.plan import GIB, PlanError, TrainingPlan, build_plan, format_plan, plan_job

QWEN_CONFIG = "configs/qwen-ko.yaml"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
REPO = Path(__file__).resolve().parent.parent


@contextmanager
def empty_hf_home(home: Path) -> Iterator[Path]:
    """HF_HOME at an empty directory and offline, so that only the shipped copy can answer. huggingface_hub reads
    these variables once, when imported (long before this test): its constants get the values a new process with
    this environment would compute; the resolution code itself is the library's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(home))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.delenv("HF_HUB_CACHE", raising=False)
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield home


@pytest.fixture
def empty_hub(tmp_path: Path) -> Iterator[Path]:
    with empty_hf_home(tmp_path / "hf-home") as home:
        yield home


def qwen_job(overrides: dict | None = None) -> JobConfig:
    return load_config(QWEN_CONFIG, overrides=overrides)


@pytest.fixture(scope="module")
def qwen_plan(tmp_path_factory: pytest.TempPathFactory) -> TrainingPlan:
    # the environment is restored before any other test (the session's tiny-ko flow must not see it)
    with empty_hf_home(tmp_path_factory.mktemp("hf-home")):
        return plan_job(qwen_job())


def test_qwen_ko_counts_match_peft(qwen_plan: TrainingPlan):
    plan = qwen_plan
    assert plan.config_source.startswith("shipped copy: ")
    assert Path(plan.config_source.split(": ", 1)[1]).name == "Qwen2.5-7B-Instruct.json"
    assert plan.trainable_params == 40_370_176
    assert plan.total_params == 7_655_986_688
    assert plan.base_params == 7_615_616_512
    assert f"{plan.trainable_percent:.3f}" == "0.527"
    assert (plan.num_layers, plan.hidden_size, plan.vocab_size) == (28, 3584, 152064)

    shapes = {m.name: (m.layers, m.in_features, m.out_features, m.params_per_layer) for m in plan.modules}
    assert shapes == {
        "q_proj": (28, 3584, 3584, 16 * (3584 + 3584)),
        "k_proj": (28, 3584, 512, 16 * (3584 + 512)),  # GQA: 4 kv heads x 128
        "v_proj": (28, 3584, 512, 16 * (3584 + 512)),
        "o_proj": (28, 3584, 3584, 16 * (3584 + 3584)),
        "gate_proj": (28, 3584, 18944, 16 * (3584 + 18944)),
        "up_proj": (28, 3584, 18944, 16 * (3584 + 18944)),
        "down_proj": (28, 18944, 3584, 16 * (18944 + 3584)),
    }
    assert [m.name for m in plan.modules] == plan.target_modules
    assert all(m.total == m.layers * m.params_per_layer for m in plan.modules)
    assert sum(m.total for m in plan.modules) == plan.trainable_params
    assert plan.other_trainable_params == 0


def test_qwen_ko_adapter_is_about_81_mb_of_bf16(qwen_plan: TrainingPlan):
    # QLoRA: SFTTrainer casts the adapter to bf16, 2 bytes/param, plus the safetensors header (392 tensors)
    assert qwen_plan.adapter_dtype == "BF16"
    header = qwen_plan.adapter_bytes - 2 * qwen_plan.trainable_params
    assert 392 * 80 < header < 392 * 160
    assert round(qwen_plan.adapter_bytes / 1e6) == 81


def test_qwen_ko_memory_per_mode(empty_hub: Path, qwen_plan: TrainingPlan):
    memory = qwen_plan.memory_gib
    for parts in memory.values():
        assert set(parts) == {"weights", "gradients", "optimizer", "activations", "total"}
        assert abs(sum(v for k, v in parts.items() if k != "total") - parts["total"]) < 0.01
    assert memory["qlora_nf4"]["total"] < memory["lora_bf16"]["total"] < memory["full_bf16_adamw"]["total"]
    # full fine-tuning in mixed precision: 16 bytes/param before activations, 113 GiB
    full = memory["full_bf16_adamw"]
    assert full["weights"] + full["gradients"] + full["optimizer"] == pytest.approx(16 * 7_615_616_512 / GIB, abs=0.01)
    # bf16 base 14.2 GiB; NF4 + double quant: 6.5e9 linear weights at ~4.127 bits plus 1.09e9 bf16 (embeddings, head)
    assert memory["lora_bf16"]["weights"] == pytest.approx(14.34, abs=0.01)
    assert memory["qlora_nf4"]["weights"] == pytest.approx(5.24, abs=0.01)
    # paged_adamw_8bit: 2 bytes/param of states (+ absmax) for the 40.4M adapter parameters
    assert memory["qlora_nf4"]["optimizer"] == pytest.approx(40_370_176 * 2.03125 / GIB, abs=0.001)
    # 4 x 2048 tokens with checkpointing: 28 layer inputs + one recomputed layer + 4.6 GiB of fp32 logits
    assert 9 < memory["qlora_nf4"]["activations"] < 11

    # qwen-ko serves on the training's GPU with gpu_memory_utilization 0.45: training gets 55% less the margin.
    assert qwen_plan.serving_share == 0.45
    assert qwen_plan.gpu_gib["H100 80 GB"] == pytest.approx(81559 / 1024 * 0.55 - 1, abs=0.01)  # 42.81
    fits = qwen_plan.fits
    assert set(fits) == {"T4 16 GB", "L4 24 GB", "A10 24 GB", "L40S 48 GB", "A100 80 GB", "H100 80 GB",
                         "H200 141 GB"}
    assert not any("full_bf16_adamw" in modes for modes in fits.values())  # ~123 GiB: not on one 141 GB card
    # ~15.7 GiB of QLoRA: not in 55% of a 24 GB card (11.4 GiB), in 55% of an L40S (23.7 GiB)
    assert fits["T4 16 GB"] == fits["L4 24 GB"] == fits["A10 24 GB"] == []
    assert fits["L40S 48 GB"] == ["qlora_nf4"]
    assert fits["A100 80 GB"] == fits["H100 80 GB"] == fits["H200 141 GB"] == ["lora_bf16", "qlora_nf4"]
    # The same job without serving beside it gets the whole card less the margin: QLoRA fits a 24 GB card again.
    alone = plan_job(qwen_job({"serving.enabled": False}))
    assert alone.serving_share == 0 and alone.fits["A10 24 GB"] == alone.fits["L4 24 GB"] == ["qlora_nf4"]
    assert alone.fits["T4 16 GB"] == []  # 15.7 GiB > 16 GB - 1 GiB margin at the configured 4 x 2048


def test_plan_output_and_json_form(qwen_plan: TrainingPlan):
    text = format_plan(qwen_plan)
    for expected in ("40,370,176", "0.527%", "7,655,986,688", "7,615,616,512", "80.8 MB", "k_proj", "18944",
                     "full_bf16_adamw", "lora_bf16", "qlora_nf4", "T4 16 GB", "A10 24 GB", "A100 80 GB",
                     "H100 80 GB", "estimate", "paged_adamw_8bit"):
        assert expected in text, expected
    dumped = json.loads(json.dumps(qwen_plan.model_dump(mode="json")))
    assert dumped["trainable_params"] == 40_370_176
    assert TrainingPlan.model_validate(dumped) == qwen_plan


def test_memory_follows_the_jobs_training_settings(empty_hub: Path, qwen_plan: TrainingPlan):
    plan = plan_job(qwen_job({"training.gradient_checkpointing": False, "training.optim": "adamw_torch"}))
    assert plan.trainable_params == qwen_plan.trainable_params
    # all 28 layers keep their activations: ~90 GiB more, QLoRA no longer fits a 24 GB card
    assert plan.memory_gib["qlora_nf4"]["activations"] > 8 * qwen_plan.memory_gib["qlora_nf4"]["activations"]
    assert "qlora_nf4" not in plan.fits["A10 24 GB"]
    # torch AdamW keeps m and v in the adapter's dtype: bf16 under QLoRA, fp32 for LoRA on a bf16 base
    assert plan.memory_gib["qlora_nf4"]["optimizer"] == pytest.approx(4 * 40_370_176 / GIB, abs=0.001)
    assert plan.memory_gib["lora_bf16"]["optimizer"] == pytest.approx(8 * 40_370_176 / GIB, abs=0.001)


def test_the_tutorials_13_6m_is_a_mistral_shape_not_qwen(empty_hub: Path):
    """The tutorial's "13,631,488 trainable (0.18%)" (r16 on q,k,v,o) is a 32-layer, 4096-wide model, 8 kv heads."""
    mistral = build_plan(
        MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000),
        LoraSettings(r=16, alpha=32, target_modules=ATTENTION),
    )
    assert mistral.trainable_params == 13_631_488
    assert mistral.base_params == 7_241_732_096
    assert {m.name: (m.layers, m.out_features) for m in mistral.modules} == {
        "q_proj": (32, 4096), "k_proj": (32, 1024), "v_proj": (32, 1024), "o_proj": (32, 4096)}

    qwen = plan_job(qwen_job({"lora.target_modules": ATTENTION}))
    assert qwen.trainable_params == 10_092_544  # Qwen2.5-7B, same r and targets
    assert {m.name: (m.layers, m.out_features) for m in qwen.modules} == {
        "q_proj": (28, 3584), "k_proj": (28, 512), "v_proj": (28, 512), "o_proj": (28, 3584)}


def test_missing_config_names_model_base_and_the_fix(empty_hub: Path):
    with pytest.raises(PlanError) as error:
        plan_job(qwen_job({"model.base": "nobody/NoSuchModel-7B"}))
    message = str(error.value)
    assert message.startswith("model.base: ")
    assert "nobody/NoSuchModel-7B" in message and "hf download nobody/NoSuchModel-7B config.json" in message


PLAN_IN_CHILD = """
import json, sys
from loraflow.config import load_config
from loraflow.training.plan import plan_job
plans = [plan_job(load_config(sys.argv[1], {"model.revision": rev})).model_dump(mode="json") for rev in sys.argv[2:]]
print(json.dumps(plans))
"""


def test_hub_cache_copy_is_used_when_present(tmp_path: Path):
    """A hub cache layout holding a 2-layer config.json: a new process with HF_HOME there and HF_HUB_OFFLINE=1 plans
    from it (huggingface_hub resolves refs/main to the snapshot), by branch and by commit."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-home" / "hub" / "models--Qwen--Qwen2.5-7B-Instruct"
    shipped = json.loads((REPO / "loraflow/training/bases/Qwen2.5-7B-Instruct.json").read_text())
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "config.json").write_text(json.dumps({**shipped, "num_hidden_layers": 2}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1"}
    child = subprocess.run([sys.executable, "-c", PLAN_IN_CHILD, QWEN_CONFIG, "main", sha], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
    by_branch, by_commit = json.loads(child.stdout.strip().splitlines()[-1])
    for plan in (by_branch, by_commit):
        assert plan["config_source"] == f"hub cache: {repo / 'snapshots' / sha / 'config.json'}"
        assert plan["num_layers"] == 2
        assert plan["trainable_params"] == 40_370_176 // 28 * 2
        assert plan["total_params"] < 7_655_986_688
        assert {m["layers"] for m in plan["modules"]} == {2}


def test_tiny_ko_plan_matches_the_real_training(trained, tiny_job: JobConfig):
    plan = plan_job(tiny_job)
    assert plan.config_source.startswith("embedded: ")
    assert plan.trainable_params == int(trained.metrics["trainable_params"])
    assert sum(m.total for m in plan.modules) == plan.trainable_params
    # the adapter the train step saved: bf16 (QLoRA), header included, byte for byte
    saved = Path(trained.adapter_dir) / "adapter_model.safetensors"
    assert plan.adapter_dtype == "BF16"
    assert plan.adapter_bytes == saved.stat().st_size
