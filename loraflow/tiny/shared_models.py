"""One built tiny-ko base per machine, shared by every LORAFLOW_HOME a test session or a bench makes."""

from __future__ import annotations

from pathlib import Path

# The repo's own state dir (the Makefile's default LORAFLOW_HOME) holds the machine's built models.
SHARED_MODELS = Path(__file__).resolve().parents[2] / ".loraflow" / "models"


def share_built_models(home: Path) -> None:
    """The tiny-ko base is content-addressed and reproducible: build it once per machine (the repo's state dir),
    not once per LORAFLOW_HOME."""
    SHARED_MODELS.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(SHARED_MODELS, target_is_directory=True)
