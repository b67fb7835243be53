"""The flagship job on a machine without a GPU: every argument the qwen-ko config builds for CUDA (training, 4-bit
loading, merging, vLLM) is built here by the same code and asserted, without loading a weight. The GPU's one
property the code asks about, its compute capability (bf16 from 8.0), is the only thing patched: no GPU exists here
to answer it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from trl import SFTConfig

from loraflow.config import ConfigError, JobConfig, load_config
from loraflow.evaluation.served_parity import served_model_args
from loraflow.paths import machine_cache
from loraflow.registry.promote import judge
from loraflow.serving.server_spec import combined, job_demand, served_dtype, server_spec
from loraflow.serving.urls import served_url
from loraflow.serving.vllm_server import VllmLaunch, vllm_command, vllm_settings
from loraflow.training.arguments import peft_config, sft_arguments
from loraflow.training.models import (
    attn_implementation_for,
    bnb_config,
    dtype_for,
    from_pretrained_kwargs,
    has_bf16,
    varlen_kernel_installed,
)

SHA = "a09a35458c702b33eeacc393d103063234e8bc28"


@pytest.fixture
def qwen() -> JobConfig:
    return load_config("configs/qwen-ko.yaml")


@pytest.fixture
def bf16_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))  # an A100


@pytest.fixture
def t4(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))


@pytest.mark.parametrize(("capability", "bf16"), [((7, 5), False), ((7, 0), False), ((8, 0), True), ((8, 6), True),
                                                  ((8, 9), True), ((9, 0), True)])
def test_bf16_is_decided_by_compute_capability(capability: tuple[int, int], bf16: bool) -> None:
    # T4 7.5 and V100 7.0 emulate bf16 (torch.cuda.is_bf16_supported() says True on a T4); A100 8.0, A10 8.6,
    # L4/L40S 8.9, H100/H200 9.0 have it.
    assert has_bf16(capability) is bf16


def test_from_pretrained_gets_4bit_bf16_on_gpu_0_with_a_varlen_kernel(qwen: JobConfig, bf16_gpu: None) -> None:
    kwargs = from_pretrained_kwargs(qwen.model, qwen.quantization, padding_free=qwen.training.padding_free)
    bnb = kwargs.pop("quantization_config")
    assert bnb.load_in_4bit and bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert qwen.model.attn_implementation == "auto" and qwen.training.padding_free
    assert kwargs == {"revision": "main", "dtype": torch.bfloat16, "device_map": {"": 0},
                      "attn_implementation": "flash_attention_2" if varlen_kernel_installed() else "sdpa",
                      "trust_remote_code": False}
    # `auto`: the varlen kernel exactly when padding-free batches run on CUDA and a kernel is installed
    assert attn_implementation_for(qwen.model, "cuda", padding_free=True, varlen_installed=True) == "flash_attention_2"
    assert attn_implementation_for(qwen.model, "cuda", padding_free=True, varlen_installed=False) == "sdpa"
    assert attn_implementation_for(qwen.model, "cuda", padding_free=False, varlen_installed=True) == "sdpa"
    assert attn_implementation_for(qwen.model, "cpu", padding_free=True, varlen_installed=True) == "sdpa"
    # evaluation loads full precision, padded batches: sdpa, no device map (moved after loading)
    evaluation = from_pretrained_kwargs(qwen.model, qwen.quantization, quantized=False)
    assert (evaluation["quantization_config"], evaluation["device_map"]) == (None, None)
    assert evaluation["attn_implementation"] == "sdpa"


def test_an_explicit_attention_kernel_is_passed_as_named_and_a_typo_is_refused(qwen: JobConfig) -> None:
    for name in ("eager", "flash_attention_3", "kernels-community/flash-attn2", "kernels-community/flash-attn2@v1"):
        model = qwen.model.model_copy(update={"attn_implementation": name})
        assert attn_implementation_for(model, "cuda", padding_free=True, varlen_installed=False) == name
    with pytest.raises(ConfigError, match=r"model\.attn_implementation"):
        load_config("configs/qwen-ko.yaml", {"model.attn_implementation": "flash-attention"})


def test_sft_arguments_on_a_bf16_gpu(qwen: JobConfig, bf16_gpu: None, tmp_path: Path) -> None:
    args = sft_arguments(qwen.training, qwen.model, tmp_path)
    assert (args["bf16"], args["fp16"], args["use_cpu"]) == (True, False, False)
    assert args["optim"] == "paged_adamw_8bit"
    assert args["gradient_checkpointing"] is True
    assert args["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    batch = (args["per_device_train_batch_size"], args["gradient_accumulation_steps"], qwen.training.max_length)
    assert batch == (4, 4, 2048)
    # Padding-free batches: format_chat already dropped rows over max_length, and TRL refuses to cut them again.
    assert (args["padding_free"], args["packing"], args["max_length"]) == (True, False, None)
    assert args["learning_rate"] == 2e-4 and args["lr_scheduler_type"] == "cosine"
    # Everything else validates in SFTConfig itself (which refuses mixed precision where no GPU exists).
    config = SFTConfig(**{**args, "bf16": False, "use_cpu": True})
    assert config.optim == "paged_adamw_8bit" and config.gradient_checkpointing


def test_sft_arguments_on_a_t4_use_fp16(qwen: JobConfig, t4: None, tmp_path: Path) -> None:
    args = sft_arguments(qwen.training, qwen.model, tmp_path)
    assert (args["bf16"], args["fp16"]) == (False, True)


def test_explicit_bf16_on_a_t4_fails_before_loading(qwen: JobConfig, t4: None) -> None:
    with pytest.raises(ValueError, match=r"model\.dtype: bfloat16 is not supported"):
        dtype_for("bfloat16", "cuda")


def test_four_bit_config_is_nf4_double_quant_with_gpu_compute_dtype(qwen: JobConfig, bf16_gpu: None) -> None:
    bnb = bnb_config(qwen.quantization, "cuda")
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16


def test_lora_on_the_seven_projections(qwen: JobConfig) -> None:
    lora = peft_config(qwen.lora)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 32, 0.05)
    assert set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_vllm_command_line(qwen: JobConfig, bf16_gpu: None, tmp_path: Path) -> None:
    # What serving/servers.py starts for qwen-ko on a bf16 GPU, its base pinned to a commit.
    spec = replace(server_spec(qwen, pin=False), revision=SHA, device="cuda", dtype=served_dtype(qwen))
    capacity = combined([job_demand(qwen, [])])
    launch = VllmLaunch(spec=spec, capacity=capacity, model_path=qwen.model.base, served_name=spec.server_id,
                        port=41001, chat_template=tmp_path / "t.jinja")
    command = vllm_command(launch)

    def value(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert value("--model") == "Qwen/Qwen2.5-7B-Instruct" and value("--revision") == SHA
    assert value("--served-model-name") == spec.server_id and spec.server_id.startswith("base-qwen2.5-7b-instruct-")
    assert (value("--dtype"), value("--max-lora-rank"), value("--gpu-memory-utilization")) == ("bfloat16", "16", "0.45")
    # Slots for its champion, challenger and one draining, in a server's step of 8: more jobs rarely restart it.
    assert (value("--max-loras"), value("--max-cpu-loras")) == ("8", "8")
    assert (value("--port"), value("--host"), value("--max-model-len")) == ("41001", "127.0.0.1", "4096")
    assert "--enable-lora" in command and "--tensor-parallel-size" not in command
    # The public side is the stack's endpoint, shared with every served job: qwen-ko names no port of its own.
    assert (qwen.serving.port, qwen.serving.host) == (None, None)
    # Its environment: the compile and model-inspection caches are the machine's, shared by every server and
    # clone (a restart or another LORAFLOW_HOME compiles nothing again); its sockets are its own.
    settings, elsewhere = vllm_settings(spec, tmp_path / "a"), vllm_settings(spec, tmp_path / "b")
    assert settings["VLLM_CACHE_ROOT"] == elsewhere["VLLM_CACHE_ROOT"] == str(machine_cache() / "vllm")
    assert settings["TORCHINDUCTOR_CACHE_DIR"] == str(machine_cache() / "inductor")
    assert settings["VLLM_RPC_BASE_PATH"] != elsewhere["VLLM_RPC_BASE_PATH"]
    assert settings["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and "VLLM_API_KEY" not in settings


def test_merge_runs_in_fp32_on_the_cpu_and_saves_bf16(qwen: JobConfig, bf16_gpu: None) -> None:
    assert (qwen.merge.enabled, qwen.merge.device, qwen.merge.max_abs_logit_diff) == (True, "cpu", 1e-3)
    assert dtype_for(qwen.model.dtype if qwen.merge.dtype == "auto" else qwen.merge.dtype, "cuda") == torch.bfloat16


def test_gate_allows_one_standard_error_against_the_champion(qwen: JobConfig) -> None:
    """An adapter as good as the champion, one point lower on one task (within one s.e.), passes; three lower fails."""
    tasks = {"kobest_boolq/acc": 0.80, "kobest_copa/acc": 0.75, "kobest_hellaswag/acc_norm": 0.55,
             "kobest_sentineg/acc": 0.90, "kobest_wic/acc": 0.60}
    champion = {f"tuned/{k}": v for k, v in tasks.items()} | {f"tuned/{k}_stderr": 0.013 for k in tasks}
    champion["tuned/perplexity"] = 5.0

    def candidate(copa: float) -> dict[str, float]:
        scores = {**tasks, "kobest_copa/acc": copa}
        return ({f"tuned/{k}": v for k, v in scores.items()} | {f"base/{k}": v - 0.02 for k, v in tasks.items()}
                | {f"tuned/{k}_stderr": 0.013 for k in tasks} | {"tuned/perplexity": 5.0, "base/perplexity": 6.0})

    assert judge(qwen.promotion, candidate(0.74), champion)[0]
    passed, reasons = judge(qwen.promotion, candidate(0.72), champion)
    assert not passed and any(r.startswith("fail: kobest_copa/acc") and "1 s.e." in r for r in reasons)


def test_served_parity_scores_the_pinned_base_tokens_through_the_endpoint(qwen: JobConfig) -> None:
    pinned = qwen.model_copy(update={"model": qwen.model.model_copy(update={"revision": SHA})})
    args = served_model_args(pinned, "qwen-ko-v3", served_url(pinned.serving), "k")
    assert args["model"] == "qwen-ko-v3"
    assert args["base_url"] == "http://127.0.0.1:8000/v1/completions"
    assert (args["tokenizer"], args["revision"]) == ("Qwen/Qwen2.5-7B-Instruct", SHA)
    assert args["tokenized_requests"] is True and args["tokenizer_backend"] == "huggingface"
    assert args["max_length"] == 4096 and args["header"] == {"Authorization": "Bearer k"}
    assert pinned.serving.parity.enabled and pinned.serving.parity.limit is None
    assert set(pinned.eval.benchmarks.tasks) >= {"kobest_boolq", "kobest_copa"}


def test_fsdp_qlora_on_several_gpus_stores_4bit_weights_in_bf16(bf16_gpu: None, tmp_path: Path) -> None:
    """qwen-ko with configs/accelerate/fsdp_qlora.yaml: what the workers would load and train with, and the FSDP
    settings accelerate's own launcher derives from the file (its plugin itself needs a GPU to be built)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from loraflow.training.distributed import launch_command, uses_fsdp
    from loraflow.training.models import fsdp_dtype

    job = load_config("configs/qwen-ko.yaml", {"training.num_processes": 2,
                                               "training.accelerate_config": "fsdp_qlora.yaml"})
    assert uses_fsdp(job.training)
    bnb = bnb_config(job.quantization, "cuda", fsdp=True)
    assert bnb.bnb_4bit_quant_storage == bnb.bnb_4bit_compute_dtype == torch.bfloat16
    assert fsdp_dtype(job.model, job.quantization, "cuda") == torch.bfloat16  # the base loads in its storage dtype
    assert bnb_config(job.quantization, "cuda").bnb_4bit_quant_storage == torch.uint8  # DDP / one process
    args = sft_arguments(job.training, job.model, tmp_path)
    assert args["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    assert (args["ddp_find_unused_parameters"], args["bf16"]) == (False, True)

    command = launch_command(job.training, "cuda", tmp_path / "inputs.json")
    assert command[command.index("--num_processes") + 1] == "2" and "--multi_gpu" not in command
    assert command[-3:] == ["-m", "loraflow.training.worker", str(tmp_path / "inputs.json")]
    launch_args, _, _ = _validate_launch_command(launch_command_parser().parse_args(command[3:]))
    env = prepare_multi_gpu_env(launch_args)
    assert (env["ACCELERATE_USE_FSDP"], env["ACCELERATE_MIXED_PRECISION"]) == ("true", "bf16")
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD" and env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    assert (env["FSDP_CPU_RAM_EFFICIENT_LOADING"], env["FSDP_SYNC_MODULE_STATES"]) == ("true", "true")
    assert (env["FSDP_USE_ORIG_PARAMS"], env["FSDP_OFFLOAD_PARAMS"]) == ("false", "false")
