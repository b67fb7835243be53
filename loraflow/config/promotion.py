"""When a freshly registered adapter version earns an alias."""

from __future__ import annotations

from pydantic import Field

from loraflow.config.base import Section


class Requirement(Section):
    """A metric the candidate must hold, named as logged without the base/tuned prefix
    (e.g. `kobest_boolq/acc`, `perplexity`)."""

    metric: str
    higher_is_better: bool = True
    min_gain_over_base: float = 0.0
    min_gain_over_champion: float = 0.0


class PromotionConfig(Section):
    require: list[Requirement] = Field(default_factory=list)
    # Relative bound: tuned perplexity may be at most (1 + this) times the champion's.
    max_perplexity_regression: float = Field(default=0.0, ge=0)
    # True: a passing version becomes `champion` directly; False: it gets `challenger` and a person decides.
    auto_champion: bool = False
