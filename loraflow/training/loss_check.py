"""Whether a training's loss fell: read from its log history (log_history.json), without importing the trainer, so a
cached run can check it too."""

from __future__ import annotations

from typing import Any

# The last logged loss must be at least this much lower than the first; the run ended at 7.16 after 20 steps.
MIN_FALL = 0.05


def loss_warning(history: list[dict[str, Any]]) -> str | None:
    """A warning when the logged training loss did not fall by MIN_FALL; None when it did, or when fewer than two
    losses were logged (nothing to compare: `training.logging_steps` is larger than the run)."""
    points = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry and "step" in entry]
    if len(points) < 2:
        return None
    (first_step, first), (last_step, last) = points[0], points[-1]
    if last <= first * (1 - MIN_FALL):
        return None
    return (f"the training loss did not fall: {first:.3g} at step {first_step}, {last:.3g} at step {last_step} "
            f"(less than {MIN_FALL:.0%} lower); check what trains (`loraflow data CONFIG`), training.learning_rate "
            "and the number of steps")
