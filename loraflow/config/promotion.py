"""When a freshly registered adapter version earns an alias (`challenger`, or `champion` when automatic)."""

from __future__ import annotations

from pydantic import Field

from loraflow.config.base import Section


class Requirement(Section):
    """A metric the candidate must have, named as logged without the base/tuned prefix (e.g.
    `kobest_boolq/acc`, `perplexity`). Gains are absolute, in the metric's units, in its better direction; a
    negative gain is a tolerated loss (e.g. -0.01: may lose at most one point of accuracy). None: not compared
    with that side."""

    metric: str = Field(min_length=1)
    higher_is_better: bool = True
    # An absolute bound on the tuned score, in its better direction (`heldout/accuracy` >= 0.90). None: no bound.
    min_value: float | None = None
    min_gain_over_base: float | None = 0.0
    min_gain_over_champion: float | None = 0.0
    # How many standard errors of the difference a gain may fall short of its minimum: lm-eval reports each
    # score's standard error (`<metric>_stderr`), and two equally good adapters differ by about one of them.
    # 0: the minimum gains are strict.
    stderr_tolerance: float = Field(default=0.0, ge=0)


class PromotionConfig(Section):
    require: list[Requirement] = Field(default_factory=list)
    # Relative bound: tuned perplexity may be at most (1 + this) times the base's and the champion's.
    # None: perplexity is only judged by `require`.
    max_perplexity_regression: float | None = Field(default=0.0, ge=0)
    # True: a passing version becomes `champion` directly; False: it gets `challenger` and a person decides.
    auto_champion: bool = False
