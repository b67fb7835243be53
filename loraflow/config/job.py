"""One job = one YAML in configs/, validated as a whole."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, model_validator

from loraflow.config.base import Section
from loraflow.config.data import DataConfig
from loraflow.config.evaluation import EvalConfig
from loraflow.config.lora import LoraSettings, QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.config.promotion import PromotionConfig, task_gate
from loraflow.config.registry import RegistryConfig
from loraflow.config.schedule import ScheduleConfig
from loraflow.config.serving import MergeConfig, ServingConfig
from loraflow.config.training import TrainingConfig


class JobConfig(Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="The job's name: its Prefect deployments "
                      "(`finetune/<name>`, `parity/<name>`) and run names; lowercase letters, digits, `.`, `_`, `-`.")
    model: ModelConfig = Field(description="The base model and how it is loaded.")
    data: DataConfig = Field(description="Data sources and the rules a row must pass to become training data.")
    lora: LoraSettings = Field(default=LoraSettings(), description="The LoRA adapter's shape.")
    quantization: QuantizationConfig = Field(default=QuantizationConfig(), description="4-bit quantization of the "
                                             "frozen base (QLoRA).")
    training: TrainingConfig = Field(default=TrainingConfig(), description="Training hyper-parameters: SFT (TRL "
                                     "SFTTrainer) or DPO (TRL DPOTrainer).")
    eval: EvalConfig = Field(default=EvalConfig(), description="What is measured on the base and on base + "
                             "adapter.")
    registry: RegistryConfig = Field(description="Where runs, metrics and adapter versions are recorded (MLflow).")
    promotion: PromotionConfig = Field(default=PromotionConfig(), description="When a registered version earns an "
                                       "alias.")
    merge: MergeConfig = Field(default=MergeConfig(), description="Merging the adapter into the base.")
    serving: ServingConfig = Field(default=ServingConfig(), description="Serving the aliases on the vLLM of the "
                                   "job's base, behind the stack's endpoint.")
    schedule: ScheduleConfig | None = Field(default=None, description="Retrain on a cron schedule (the "
                                            "`finetune/<name>` deployment's); None: runs only when started.")

    @property
    def checks_served_parity(self) -> bool:
        """Whether a served version of this job is scored as served (docs/serving.md): serving and its parity check
        are on, and there is something to score (benchmark tasks or the held-out task)."""
        return (self.serving.enabled and self.serving.parity.enabled
                and bool(self.eval.benchmarks.tasks or self.eval.heldout.enabled))

    @model_validator(mode="before")
    @classmethod
    def _gate_follows_the_task(cls, raw: Any) -> Any:
        """With `eval.heldout` on and no `promotion.require` given, the gate is the task's own (`task_gate`), set
        here so that the job the run records shows the requirement it applied."""
        if not isinstance(raw, dict):
            return raw
        try:
            heldout = EvalConfig.model_validate(raw.get("eval") or {}).heldout
            promotion = PromotionConfig.model_validate(raw.get("promotion") or {})
        except ValidationError:
            return raw  # reported with its field path by the job's own validation
        if not heldout.enabled or "require" in promotion.model_fields_set:
            return raw
        return {**raw, "promotion": promotion.model_copy(update={"require": task_gate(heldout.kind)})}

    @model_validator(mode="after")
    def _data_fits_the_method(self) -> JobConfig:
        """A DPO job reads preference pairs and an SFT job conversations; a gate against the starting point needs
        one; the held-out generation task scores conversations."""
        dpo = self.training.method == "dpo"
        for index, source in enumerate(self.data.sources):
            if source.fields.is_pair != dpo:
                need = "`prompt`, `chosen` and `rejected`" if dpo else "`messages` or `prompt` + `response`"
                raise ValueError(f"data.sources[{index}].fields: training.method {self.training.method} maps {need}")
        if dpo and self.eval.heldout.enabled:
            raise ValueError("eval.heldout: scores generated conversations; a DPO job's held-out pairs are scored "
                             "by preference accuracy (set eval.heldout.enabled: false)")
        for index, requirement in enumerate(self.promotion.require):
            if requirement.min_gain_over_start is not None and self.training.init_from is None:
                raise ValueError(f"promotion.require[{index}].min_gain_over_start: there is no starting point to "
                                 "compare with (training.init_from is not set)")
        return self
