"""When a freshly registered adapter version earns an alias (`challenger`, or `champion` when automatic)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loraflow.config.base import Section


class Requirement(Section):
    """A metric the candidate must have, named as logged without the base/tuned prefix (e.g.
    `kobest_boolq/acc`, `perplexity`). Gains are absolute, in the metric's units, in its better direction; a
    negative gain is a tolerated loss (e.g. -0.01: may lose at most one point of accuracy). None: not compared
    with that side."""

    metric: str = Field(min_length=1, description="The metric as logged without the base/tuned prefix, e.g. "
                        "`kobest_boolq/acc`.")
    higher_is_better: bool = Field(default=True, description="The metric's better direction.")
    min_value: float | None = Field(default=None, description="An absolute bound on the tuned score, in its better "
                                    "direction (`heldout/accuracy` >= 0.90). None: no bound.")
    min_gain_over_base: float | None = Field(default=0.0, description="The least gain over the base, in the "
                                             "metric's units (negative: a tolerated loss). None: not compared.")
    min_gain_over_champion: float | None = Field(default=0.0, description="The least gain over the current "
                                                 "champion, in the metric's units. None: not compared.")
    min_gain_over_start: float | None = Field(default=None, description="The least gain over the starting point "
                                              "(the version training.init_from named, measured beside the tuned "
                                              "adapter), in the metric's units. None: not compared.")
    # lm-eval reports each score's standard error (`<metric>_stderr`); two equally good adapters differ by about one.
    stderr_tolerance: float = Field(default=0.0, ge=0, description="How many standard errors of the difference a "
                                    "gain may fall short of its minimum; 0: the minimum gains are strict.")


# The held-out headline metric of each `eval.heldout.kind` and one point of it (accuracy is 0-1, chrF 0-100).
HEADLINE = {"labels": ("heldout/accuracy", 0.01), "text": ("heldout/chrf", 1.0)}


def task_gate(kind: Literal["labels", "text"]) -> list[Requirement]:
    """The default gate of a job with `eval.heldout` on: its headline metric beats the base by a point and is not
    below the champion's (a tuned model that answers no label right is never a challenger on perplexity alone)."""
    metric, one_point = HEADLINE[kind]
    return [Requirement(metric=metric, min_gain_over_base=one_point, min_gain_over_champion=0.0)]


class PromotionConfig(Section):
    require: list[Requirement] = Field(default_factory=list, description="The metrics a version must pass to earn "
                                       "an alias. Not given: with `eval.heldout` on, the held-out headline metric "
                                       "(`heldout/accuracy` for labels, `heldout/chrf` for text) must beat the base "
                                       "by one point and match the champion; else none.")
    max_perplexity_regression: float | None = Field(
        default=0.0, ge=0, description="Tuned perplexity may be at most (1 + this) times the base's and the "
        "champion's. None: perplexity is only judged by `require`.")
    auto_champion: bool = Field(default=False, description="True: a passing version becomes `champion` directly; "
                                "False: it gets `challenger` and a person decides.")
