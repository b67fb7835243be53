"""Label-set scores of generated answers: accuracy, macro-F1, the per-class table, the confusion matrix (PNG + CSV)
and the most confused pairs. An answer outside the label set is wrong for its row and counted under `(other)`.

Files are prefixed with the model's label (`tuned.heldout_confusion.png`) so base and tuned share a folder.
"""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

OTHER = "(other)"
CONFUSION_CSV = "heldout_confusion.csv"
CONFUSION_PNG = "heldout_confusion.png"
PER_CLASS_CSV = "heldout_per_class.csv"
CONFUSED_MD = "heldout_confused_pairs.md"


def confused_pairs(matrix: np.ndarray, names: list[str], top: int) -> list[tuple[str, str, int]]:
    """(reference, answered, rows) off the diagonal, most frequent first (ties by name: a stable report)."""
    pairs = [(names[i], names[j], int(matrix[i, j])) for i in range(matrix.shape[0])
             for j in range(matrix.shape[1]) if i != j and matrix[i, j] > 0]
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))[:top]


def label_font() -> Path:
    """NanumGothic (Hangul and Latin) from the `koreanize-matplotlib` wheel: matplotlib's bundled font has no
    Hangul (카드도착 would be boxes), and a system font may not be there. The file is located, not imported: the
    package's import changes matplotlib's global font and needs distutils, gone in Python 3.12."""
    spec = importlib.util.find_spec("koreanize_matplotlib")
    assert spec is not None and spec.submodule_search_locations, "koreanize-matplotlib is in the locked install"
    return Path(spec.submodule_search_locations[0]) / "fonts" / "NanumGothic.ttf"


def confusion_figure(matrix: np.ndarray, names: list[str], title: str) -> Any:
    """The confusion matrix as a matplotlib Figure, rows and columns named by the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.font_manager import FontProperties

    font = FontProperties(fname=label_font(), size=7)
    size = 3 + 0.35 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontproperties=font)
    ax.set_yticks(range(matrix.shape[0]), names[: matrix.shape[0]], fontproperties=font)
    ax.set_xlabel("answered")
    ax.set_ylabel("reference")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=6,
                    color="white" if count > matrix.max() / 2 else "black")
    fig.colorbar(image, ax=ax, fraction=0.04)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def _plot(matrix: np.ndarray, names: list[str], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = confusion_figure(matrix, names, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def label_metrics(pairs: list[tuple[str, str]], labels: list[str], out_dir: Path, label: str,
                  top: int = 10) -> tuple[dict[str, float], list[str]]:
    """`pairs`: (reference, answer) per row. Returns the flat scores and the files written."""
    known = set(labels)
    references = [ref.strip() for ref, _ in pairs]
    answers = [ans.strip() if ans.strip() in known else OTHER for _, ans in pairs]
    correct = [float(r == a) for r, a in zip(references, answers, strict=True)]
    n = len(correct)
    accuracy = sum(correct) / n
    # The standard error lm-eval gives a mean (sample standard deviation / sqrt(n)): the gate and the served check
    # read `<metric>_stderr` as they do for lm-eval's own scores.
    stderr = math.sqrt(sum((c - accuracy) ** 2 for c in correct) / (n - 1) / n) if n > 1 else 0.0
    precision, recall, f1, support = precision_recall_fscore_support(references, answers, labels=labels,
                                                                     zero_division=0)
    columns = [*labels, OTHER]
    matrix = confusion_matrix(references, answers, labels=columns)[: len(labels)]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {name: out_dir / f"{label}.{name}" for name in (CONFUSION_CSV, CONFUSION_PNG, PER_CLASS_CSV,
                                                            CONFUSED_MD)}
    with files[CONFUSION_CSV].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["reference \\ answered", *columns])
        writer.writerows([name, *map(int, row)] for name, row in zip(labels, matrix, strict=True))
    with files[PER_CLASS_CSV].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label", "precision", "recall", "f1", "support"])
        writer.writerows([name, f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", int(s)]
                         for name, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True))
    worst = confused_pairs(matrix, columns, top)
    files[CONFUSED_MD].write_text(
        f"### most confused pairs ({label})\n\n| reference | answered | rows |\n|---|---|---:|\n"
        + "".join(f"| {ref} | {ans} | {count} |\n" for ref, ans, count in worst), encoding="utf-8")
    _plot(matrix, columns, files[CONFUSION_PNG], f"{label}: accuracy {accuracy:.3f} on {n} rows")
    present = [i for i, s in enumerate(support) if s > 0]  # macro over the classes the held-out split has
    scores = {
        "accuracy": accuracy,
        "accuracy_stderr": stderr,
        "macro_f1": float(np.mean([f1[i] for i in present])) if present else 0.0,
        "other_answers": answers.count(OTHER) / n,
    }
    return scores, [str(p) for p in files.values()]
