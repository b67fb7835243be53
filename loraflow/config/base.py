"""The base of every config section: strict (unknown keys are errors) and immutable; the value sets several sections
share."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

# `auto` is decided on the machine that runs the step (loraflow/training/models.py: dtype_for, device_for).
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
DeviceName = Literal["auto", "cpu", "cuda"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
