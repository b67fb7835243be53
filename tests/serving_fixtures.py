"""Helpers for the merge and serving tests: small PEFT adapters on the tiny-ko base, registered in a real
MLflow SQLite store the way the register step does it (adapter dir as a run artifact, `template_sha` tag)."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow import MlflowClient
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraflow.hashing import sha_of_text
from loraflow.templates import load_template

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def retarget_adapter(adapter_dir: Path, module: str, renamed: str) -> Path:
    """Rename a target module in weights and config to one the base does not have: a target-modules
    mismatch (vLLM may load it and silently serve the base, vllm#34186)."""
    weights_file = adapter_dir / "adapter_model.safetensors"
    weights = {k.replace(f".{module}.", f".{renamed}."): v for k, v in load_file(str(weights_file)).items()}
    save_file(weights, str(weights_file))
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = [renamed if m == module else m for m in config["target_modules"]]
    config_file.write_text(json.dumps(config, indent=2))
    return adapter_dir


@dataclass(frozen=True)
class RegistryFixture:
    tracking_uri: str
    model_name: str
    experiment_id: str

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def register(self, adapter_dir: Path, template_sha: str | None = None) -> str:
        """Log the adapter dir as a run artifact and register it as a new version; returns the version."""
        client = self.client()
        run = client.create_run(self.experiment_id)
        client.log_artifacts(run.info.run_id, str(adapter_dir), "adapter")
        client.set_terminated(run.info.run_id)
        if not client.search_registered_models(f"name = '{self.model_name}'"):
            client.create_registered_model(self.model_name)
        sha = template_sha or sha_of_text(load_template("qwen2.5"))
        version = client.create_model_version(
            self.model_name,
            source=f"{run.info.artifact_uri}/adapter",
            run_id=run.info.run_id,
            tags={"template_sha": sha, "base_model": "embedded:tiny-ko"},
        )
        return str(version.version)

    def set_alias(self, alias: str, version: str) -> None:
        self.client().set_registered_model_alias(self.model_name, alias, version)

    def delete_alias(self, alias: str) -> None:
        self.client().delete_registered_model_alias(self.model_name, alias)

    def tags(self, version: str) -> dict[str, str]:
        return self.client().get_model_version(self.model_name, version).tags


def make_registry(root: Path, model_name: str) -> RegistryFixture:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # An explicit artifact location: a fresh store's default experiment would write to ./mlruns.
    experiment_id = MlflowClient(tracking_uri=uri).create_experiment(
        "serving-tests", artifact_location=(root / "artifacts").as_uri()
    )
    return RegistryFixture(tracking_uri=uri, model_name=model_name, experiment_id=experiment_id)
