"""Random LoRA adapters on a base and a plain MLflow registry to register them in: what tests and benches that need
an adapter, not a learned one, use (serving throughput, promotion moves, vLLM loading)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow import MlflowClient
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraflow.hashing import sha_of_text
from loraflow.registry.client import client_at
from loraflow.templates import load_template

TINY_KO = "tiny-ko"  # the model of configs/tiny-ko.yaml


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


@dataclass(frozen=True)
class AdapterRegistry:
    """An MLflow store with one experiment, where adapter directories become versions of `model_name` carrying
    the tags the register step writes (template sha, base) that serving reads."""

    tracking_uri: str
    model_name: str
    experiment_id: str

    def client(self) -> MlflowClient:
        return client_at(self.tracking_uri)

    def register(self, adapter_dir: Path, template_sha: str | None = None) -> str:
        """Log the adapter dir as a run artifact and register it as a new version; returns the version."""
        client = self.client()
        run = client.create_run(self.experiment_id)
        client.log_artifacts(run.info.run_id, str(adapter_dir), "adapter")
        client.set_terminated(run.info.run_id)
        if not client.search_registered_models(f"name = '{self.model_name}'"):
            client.create_registered_model(self.model_name)
        sha = template_sha or sha_of_text(load_template("qwen2.5"))
        version = client.create_model_version(self.model_name, source=f"{run.info.artifact_uri}/adapter",
                                              run_id=run.info.run_id,
                                              tags={"template_sha": sha, "base_model": "embedded:tiny-ko"})
        return str(version.version)

    def set_alias(self, alias: str, version: str) -> None:
        self.client().set_registered_model_alias(self.model_name, alias, version)

    def delete_alias(self, alias: str) -> None:
        self.client().delete_registered_model_alias(self.model_name, alias)

    def tags(self, version: str) -> dict[str, str]:
        return self.client().get_model_version(self.model_name, version).tags
