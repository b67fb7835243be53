"""One job = one YAML in configs/, validated as a whole."""

from __future__ import annotations

from pydantic import Field, model_validator

from loraflow.config.base import Section
from loraflow.config.data import DataConfig
from loraflow.config.evaluation import EvalConfig
from loraflow.config.lora import LoraSettings, QuantizationConfig
from loraflow.config.model import ModelConfig
from loraflow.config.promotion import PromotionConfig
from loraflow.config.registry import RegistryConfig
from loraflow.config.serving import MergeConfig, ServingConfig
from loraflow.config.training import TrainingConfig


class JobConfig(Section):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="The job's name: its Prefect deployments "
                      "(`finetune/<name>`, `serve/<name>`) and run names; lowercase letters, digits, `.`, `_`, `-`.")
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
    serving: ServingConfig = Field(default=ServingConfig(), description="Serving the aliases on vLLM behind "
                                   "loraflow's router.")

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
