"""What each step returns: small, typed, JSON-able records of paths, hashes and metrics.

Heavy objects (models) never cross step boundaries; directories do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

RESULT_FILE = "result.json"


class StepResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    path: str


class DatasetResult(StepResult):
    """`path` holds `dataset/` (save_to_disk, splits train/eval), `stats.json`, `rejected.jsonl` and
    `manifest.json` (each source's resolved revision or manifest sha; every file's path, sha and rows)."""

    dataset_sha: str
    stats: dict[str, Any]

    @property
    def dataset_dir(self) -> str:
        return str(Path(self.path) / "dataset")

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest `loraflow.data.sources.data_changes` compares ({} for outputs built before it existed)."""
        return self.stats.get("manifest", {})


class ChatResult(StepResult):
    """`path` holds `tokenized/` (input_ids + assistant_masks per split) and `token_lengths.png`."""

    dataset_sha: str
    template_sha: str
    stats: dict[str, Any]

    @property
    def tokenized_dir(self) -> str:
        return str(Path(self.path) / "tokenized")


class TrainResult(StepResult):
    """`path` holds `adapter/` (PEFT, with tokenizer + chat template), `checkpoints/`, `log_history.json`."""

    adapter_sha: str
    metrics: dict[str, float]
    run_id: str | None = None  # the MLflow run that watched the training live (register fills it)

    @property
    def adapter_dir(self) -> str:
        return str(Path(self.path) / "adapter")

    @property
    def log_history(self) -> str:
        return str(Path(self.path) / "log_history.json")


class ParentVersion(BaseModel):
    """The registered version a job starts from (`training.init_from`), pinned once by the pre-flight: the alias
    resolved to a version, its adapter downloaded and hashed. Keys, training, evaluation and lineage read this."""

    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    requested: str  # what training.init_from said (`tiny-ko@champion`)
    adapter_sha: str  # the downloaded adapter's content (as the register step hashes an adapter)
    adapter_dir: str
    run_id: str | None
    lineage: str  # this version and its own parents, nearest first: `tiny-ko-dpo/2 <- tiny-ko/3`

    @property
    def name(self) -> str:
        """`tiny-ko/3`: MLflow's way of naming a version (`models:/tiny-ko/3`)."""
        return f"{self.model_name}/{self.version}"

    @property
    def identity(self) -> tuple[str, str, str]:
        """What a step's key hashes: which version, and what its adapter holds (not where it was downloaded)."""
        return self.model_name, self.version, self.adapter_sha


class EvalResult(StepResult):
    """Metrics named `base/<name>` and `tuned/<name>`; artifact files under `path`."""

    metrics: dict[str, float]
    artifacts: list[str]


class RegisteredVersion(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    run_id: str
    experiment_id: str
    source: str
    tracking_uri: str  # where the version and its run live
    created: bool  # False when an identical version already existed (cached rerun)


class MergeResult(StepResult):
    """`path` holds `merged/`: a plain transformers model with the adapter's tokenizer and chat template."""

    adapter_sha: str
    dtype: str  # what the merged model was saved in (the serving dtype)
    max_abs_logit_diff: float  # merged vs base + adapter, both in fp32; the saved files equal the merge bit for bit

    @property
    def merged_dir(self) -> str:
        return str(Path(self.path) / "merged")
