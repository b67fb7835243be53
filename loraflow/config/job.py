"""One job = one YAML in configs/, validated as a whole."""

from __future__ import annotations

from pydantic import Field

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
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    model: ModelConfig
    data: DataConfig
    lora: LoraSettings = LoraSettings()
    quantization: QuantizationConfig = QuantizationConfig()
    training: TrainingConfig = TrainingConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig
    promotion: PromotionConfig = PromotionConfig()
    merge: MergeConfig = MergeConfig()
    serving: ServingConfig = ServingConfig()
