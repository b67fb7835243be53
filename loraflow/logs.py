"""What a person reads: each step's own lines, and a warning only where they must act.

Dependencies' known messages that ask nothing of the user are dropped once per process (`quiet_dependencies`), each
named below with the reason. Progress bars are drawn only on a terminal; elsewhere (a worker's log file, CI, the
flow run's logs in Prefect) `progress` logs a line every PROGRESS_PERCENT percent instead, and the libraries' own
bars are switched off through their environment variables, which the processes we start inherit.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from functools import partial
from typing import TypeVar

T = TypeVar("T")
PROGRESS_PERCENT = 10
log = logging.getLogger("loraflow.progress")

# Logger -> the level below which its records ask nothing of the user.
QUIET_LOGGERS = {
    # Logged at import on CPUs with AVX512-BF16 when the optional `kernels` package is absent: bitsandbytes then uses
    # its own CPU kernels, which loraflow's QLoRA on CPU is built and tested on.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
    # "Started/Stopping system metrics monitoring" around every training: the metrics themselves are in the run.
    "mlflow.system_metrics": logging.WARNING,
    # "Creating initial MLflow database tables..." on a new store: its first use, nothing to do.
    "mlflow.store.db.utils": logging.WARNING,
}
# Logger -> the starts of messages it logs on every call that ask nothing of the user.
KNOWN_MESSAGES = {
    # Twice per lm-eval wrapper, four wrappers per evaluation: loraflow hands lm-eval the model it loaded (at serving
    # precision, in this one process) on purpose.
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",
                                   "Passed an already-initialized model through `pretrained`"),
    # Once per task and model: loraflow sets `num_fewshot` (eval.benchmarks.num_fewshot) on purpose.
    "lm_eval.evaluator": ("Overwriting default num_fewshot of",),
    # Per served-parity run: vLLM's OpenAI server takes batched requests of any lengths.
    "lm_eval.models.api_models": ("Batch size > 1 detected",),
}
# The libraries' own progress bars, off where no terminal shows them (read when each library is imported).
NO_BARS_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def on_terminal() -> bool:
    return sys.stderr.isatty()


def quiet_dependencies() -> None:
    """Drop the known messages above in this process; without a terminal, turn the libraries' bars off too."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name, prefixes in KNOWN_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    if not on_terminal():
        for name, value in NO_BARS_ENV.items():
            os.environ.setdefault(name, value)


def without_request_bars(lm: T) -> T:
    """An lm-eval model whose request bars show only on a terminal: lm-eval's evaluator never sets `disable_tqdm`
    (its request methods' own argument), so without a terminal they would flood the log."""
    if not on_terminal():
        for request_type in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, request_type, partial(getattr(lm, request_type), disable_tqdm=True))
    return lm


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """`items`, with a progress bar on a terminal, else a log line each PROGRESS_PERCENT percent of `total`."""
    total = len(items) if total is None else total  # type: ignore[arg-type]
    if on_terminal():
        from tqdm.auto import tqdm  # imported late: tqdm reads TQDM_* variables once, at import

        yield from tqdm(items, desc=desc, total=total, mininterval=5)
        return
    mark = PROGRESS_PERCENT
    for done, item in enumerate(items, 1):
        yield item
        percent = done * 100 // total
        if percent >= mark:
            log.info("%s: %d%% (%d/%d)", desc, percent, done, total)
            mark = (percent // PROGRESS_PERCENT + 1) * PROGRESS_PERCENT
