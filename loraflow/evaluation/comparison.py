"""Base vs tuned, side by side: a markdown table and a bar chart of every metric (logged by `register`).

Metrics are named `base/<name>` and `tuned/<name>`, plus `start/<name>` for a job that started from a registered
version (the tuned adapter's change is then shown against that starting point); `<name>_stderr` entries are shown
as ± on their metric.
Benchmark scores (`<task>/<metric>`, on a 0..1 scale) share a panel; each model-level value (perplexity, nll)
gets its own, since their scales differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

TABLE_FILE = "comparison.md"
CHART_FILE = "comparison.png"
LABELS = ("base", "start", "tuned")
COLORS = {"base": "#8c8c8c", "start": "#dd8452", "tuned": "#4c72b0"}


def metric_names(metrics: dict[str, float]) -> list[str]:
    """Names measured on base, start or tuned, without the prefix and without the stderr companions."""
    names = {key.split("/", 1)[1] for key in metrics if key.split("/", 1)[0] in LABELS and "/" in key}
    return sorted(name for name in names if not name.endswith("_stderr"))


def measured_labels(metrics: dict[str, float]) -> list[str]:
    """base and tuned, with start between them when a starting point was measured."""
    return [label for label in LABELS if label != "start" or any(key.startswith("start/") for key in metrics)]


def _cell(metrics: dict[str, float], label: str, name: str) -> str:
    value = metrics.get(f"{label}/{name}")
    if value is None:
        return ""
    stderr = metrics.get(f"{label}/{name}_stderr")
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def comparison_table(metrics: dict[str, float]) -> str:
    labels = measured_labels(metrics)
    against = labels[-2]  # the tuned adapter's change: over its starting point when there is one, else the base
    lines = ["| metric | " + " | ".join(labels) + f" | tuned − {against} |", "|---|" + "---:|" * (len(labels) + 1)]
    for name in metric_names(metrics):
        reference, tuned = metrics.get(f"{against}/{name}"), metrics.get(f"tuned/{name}")
        delta = f"{tuned - reference:+.4f}" if reference is not None and tuned is not None else ""
        cells = [name, *(_cell(metrics, label, name) for label in labels), delta]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _bars(ax: Axes, metrics: dict[str, float], names: list[str]) -> None:
    labels = measured_labels(metrics)
    width = 0.8 / len(labels)
    for offset, label in enumerate(labels):
        values = [metrics.get(f"{label}/{name}", float("nan")) for name in names]
        errors = [metrics.get(f"{label}/{name}_stderr", 0.0) for name in names]
        positions = [i + (offset - (len(labels) - 1) / 2) * width for i in range(len(names))]
        ax.bar(positions, values, width, yerr=errors, label=label, color=COLORS[label], capsize=2)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def comparison_chart(metrics: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = metric_names(metrics)
    scores = [n for n in names if "/" in n]
    # One panel for all benchmark scores (0..1), one per model-level value (perplexity, nll...): own scales.
    panels = ([scores] if scores else []) + [[n] for n in names if "/" not in n]
    widths = [len(group) + 1 for group in panels] or [1]
    fig, axes = plt.subplots(1, len(widths), figsize=(2 + 0.8 * sum(widths), 4),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, group in zip(axes[0], panels, strict=False):
        _bars(ax, metrics, group)
        ax.set_title("benchmarks" if group is scores else group[0], fontsize=10)
    fig.suptitle(" vs ".join(measured_labels(metrics)))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_comparison(metrics: dict[str, float], out_dir: Path) -> list[Path]:
    """Write the table and the chart into out_dir; returns their paths (for MLflow artifacts)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table, chart = out_dir / TABLE_FILE, out_dir / CHART_FILE
    table.write_text(comparison_table(metrics), encoding="utf-8")
    comparison_chart(metrics, chart)
    return [table, chart]
