"""A plain MLflow store where adapter directories become registered versions the way the register step leaves them
(tags included): what tests and benches use to register adapters they made rather than trained."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from loraflow.hashing import sha_of_text
from loraflow.registry.client import client_at
from loraflow.templates import load_template


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
