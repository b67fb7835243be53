"""Content-addressed step outputs: the seam between plain functions and Prefect's cross-run cache.

A step's key (loraflow/keys.py) hashes everything its output depends on (upstream hashes, its config sections,
its code). Its output lives in work/<step>/<key>/ and is complete once `result.json` is written (last,
atomically). A cached result whose files are gone is a miss.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from loraflow import paths
from loraflow.results import RESULT_FILE, StepResult

R = TypeVar("R", bound=StepResult)


def step_dir(step: str, key: str) -> Path:
    return paths.work_dir() / step / key


def is_done(step: str, key: str) -> bool:
    return (step_dir(step, key) / RESULT_FILE).is_file()


def load_result(step: str, key: str, result_type: type[R]) -> R | None:
    file = step_dir(step, key) / RESULT_FILE
    if not file.is_file():
        return None
    return result_type.model_validate_json(file.read_text())


def save_result(result: StepResult) -> None:
    target = Path(result.path) / RESULT_FILE
    fd, tmp = tempfile.mkstemp(dir=result.path, prefix=".result-")
    with os.fdopen(fd, "w") as fh:
        fh.write(result.model_dump_json(indent=2))
    os.replace(tmp, target)


def run_step(step: str, key: str, result_type: type[R], produce: Callable[[Path], R]) -> R:
    """Return the step's finished result for `key`, producing it in its directory when missing.

    `produce` may find a partial directory (a crash) and continue from it (training resumes its checkpoint).
    """
    if (done := load_result(step, key, result_type)) is not None:
        return done
    out_dir = step_dir(step, key)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = produce(out_dir)
    save_result(result)
    return result


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
