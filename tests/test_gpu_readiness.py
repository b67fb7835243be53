"""The GPU path's guards and arguments, on a machine without a GPU: what the qwen-ko evaluation hands lm-eval's vLLM
model, the free-memory check before any vLLM starts (its message names both numbers), the bitsandbytes smoke check
(run for real on the CPU kernel; refused with a clear message without a GPU), and the peak-memory metrics. Where a
GPU's answer is needed (free memory, device count) it is the one thing patched: no GPU exists here to give it."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from loraflow.config import ConfigError, JobConfig, load_config
from loraflow.errors import LoraflowError
from loraflow.evaluation.benchmarks import eval_backend, vllm_model_args
from loraflow.training import device
from loraflow.training.device import (
    GIB,
    NF4_MAX_RELATIVE_ERROR,
    GpuMemoryTooLow,
    check_bitsandbytes_cuda,
    gpu_memory_problem,
    quantize_roundtrip_error,
    require_free_gpu_memory,
)
from loraflow.training.train import peak_gpu_mb
from tests.fixtures import make_adapter

ADAPTER_TARGETS = ["q_proj", "v_proj"]


@pytest.fixture
def qwen(monkeypatch: pytest.MonkeyPatch) -> JobConfig:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))  # an H100
    return load_config("configs/qwen-ko.yaml")


def test_qwen_ko_evaluates_through_vllm_on_cuda_and_through_hf_on_cpu(qwen: JobConfig) -> None:
    assert qwen.eval.backend == "auto" and eval_backend(qwen.model, qwen.eval) == "vllm"
    cpu = qwen.model.model_copy(update={"device": "cpu"})
    assert eval_backend(cpu, qwen.eval) == "hf"
    training_view = qwen.eval.model_copy(update={"precision": "training"})
    assert eval_backend(qwen.model, training_view) == "hf"  # the 4-bit view exists only in process
    with pytest.raises(ConfigError, match=r"eval\.backend: `vllm` needs model\.device cuda"):
        eval_backend(cpu, qwen.eval.model_copy(update={"backend": "vllm"}))


def test_vllm_model_args_for_the_base_and_for_base_plus_adapter(qwen: JobConfig, tiny_base_dir, tmp_path) -> None:
    base = vllm_model_args(qwen.model, qwen.eval, None)
    assert base == {"pretrained": "Qwen/Qwen2.5-7B-Instruct", "revision": "main", "trust_remote_code": False,
                    "dtype": "bfloat16", "gpu_memory_utilization": 0.4, "batch_size": "auto", "max_model_len": 4096}
    # qwen-ko's evaluation vLLM and its serving vLLM fit one GPU together (vLLM's own default is 0.9)
    assert qwen.eval.gpu_memory_utilization + qwen.serving.gpu_memory_utilization < 0.9
    adapter = make_adapter(tiny_base_dir, tmp_path / "adapter", r=24, targets=ADAPTER_TARGETS, seed=1)
    tuned = vllm_model_args(qwen.model, qwen.eval, adapter)
    # the adapter as a LoRA of the smallest rank vLLM accepts that holds r=24
    assert tuned == base | {"lora_local_path": str(adapter), "max_lora_rank": 32}


@pytest.mark.parametrize(("free_gib", "utilization", "fits"), [(40, 0.45, True), (30, 0.45, False),
                                                                (70, None, False), (73, None, True)])
def test_vllm_needs_its_share_free(free_gib: float, utilization: float | None, fits: bool) -> None:
    problem = gpu_memory_problem(int(free_gib * GIB), 80 * GIB, utilization, "serving.gpu_memory_utilization")
    assert (problem is None) is fits
    if not fits:
        share = utilization or 0.9
        assert f"{free_gib:.1f} GiB free" in problem and f"= {share * 80:.1f} GiB needed" in problem
        assert f"serving.gpu_memory_utilization={share} x 80.0 GiB total" in problem


def test_a_vllm_start_is_refused_before_it_starts_with_both_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    free = {0: 70 * GIB, 1: 20 * GIB}  # GPU 1 is held by another process
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: (free[index], 80 * GIB))
    require_free_gpu_memory(0.45, 1, "serving.gpu_memory_utilization")  # one GPU: fits
    with pytest.raises(GpuMemoryTooLow, match=r"GPU 1: 20\.0 GiB free on the GPU, but eval\.gpu_memory_utilization="
                                              r"0\.4 x 80\.0 GiB total = 32\.0 GiB needed"):
        require_free_gpu_memory(0.4, 2, "eval.gpu_memory_utilization")


def test_the_nf4_round_trip_check_is_real_and_refuses_without_a_gpu() -> None:
    # The CPU kernel of the same bitsandbytes: NF4's 16 levels give ~9% mean relative error, a broken kernel >= 1.
    error = quantize_roundtrip_error("cpu")
    assert 0.02 < error < NF4_MAX_RELATIVE_ERROR
    assert not torch.cuda.is_available()
    with pytest.raises(LoraflowError, match=r"check-gpu: no CUDA GPU visible to torch .*loraflow check-gpu"):
        check_bitsandbytes_cuda()


def test_released_memory_collects_cycles_the_step_left(monkeypatch: pytest.MonkeyPatch) -> None:
    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    class Cycle:
        pass

    gc.disable()  # only the release may collect it
    try:
        with device.released_device_memory():
            held = Cycle()
            held.me = held  # type: ignore[attr-defined]
            ref = weakref.ref(held)
            del held
        assert ref() is None and emptied == [True]
    finally:
        gc.enable()


def test_peak_gpu_memory_is_reported_only_on_cuda() -> None:
    assert peak_gpu_mb("cpu") == {}
