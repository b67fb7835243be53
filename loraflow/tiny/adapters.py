"""Random LoRA adapters on a base: what tests and benches that need an adapter, not a learned one, use (serving
throughput, promotion moves, vLLM loading); loraflow/registry/adapter_store.py registers them."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraflow.templates import load_template


def make_adapter(base_dir: Path, out_dir: Path, *, r: int, targets: list[str], seed: int, b_std: float = 0.3) -> Path:
    """A LoRA adapter whose lora_B is random (PEFT inits it to zero: no change); b_std=0 keeps it zero."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name and b_std > 0:
            torch.nn.init.normal_(param, std=b_std)
    model.save_pretrained(str(out_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    tokenizer.chat_template = load_template("qwen2.5")  # as the train step saves it
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
