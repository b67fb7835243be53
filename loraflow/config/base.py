"""The base of every config section: strict (unknown keys are errors) and immutable."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
