"""What a person reads: dependencies' known messages are dropped (each one once checked against the library that
logs it), and without a terminal progress is a log line every few percent instead of a bar."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from loraflow.logs import NO_BARS_ENV, QUIET_LOGGERS, progress, quiet_dependencies


def test_progress_without_a_terminal_is_a_line_every_ten_percent(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="loraflow.progress")
    assert list(progress(range(20), desc="pretraining")) == list(range(20))
    assert [r.getMessage() for r in caplog.records] == [
        f"pretraining: {p}% ({p // 5}/20)" for p in range(10, 101, 10)]
    caplog.clear()
    assert list(progress(iter("abc"), desc="three", total=3)) == ["a", "b", "c"]
    assert [r.getMessage() for r in caplog.records] == ["three: 33% (1/3)", "three: 66% (2/3)", "three: 100% (3/3)"]


def test_without_a_terminal_the_libraries_draw_no_bars() -> None:
    """pytest captures stderr: no terminal. conftest.py configured this process as every entry point does."""
    assert {name: os.environ.get(name) for name in NO_BARS_ENV} == NO_BARS_ENV


def test_lm_eval_is_not_told_about_the_model_we_hand_it(tiny_base_dir: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_dependencies()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir))
    with caplog.at_level(logging.WARNING):
        HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(str(tiny_base_dir)), batch_size=1)
        logging.getLogger("lm_eval.models.huggingface").warning("another warning still shows")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")] == ["another warning still shows"]


def test_bitsandbytes_cpu_kernel_notice_is_dropped() -> None:
    """Logged at import on CPUs with AVX512-BF16, through this module's logger, at WARNING."""
    from bitsandbytes.backends.cpu import ops

    quiet_dependencies()
    assert ops.logger.name in QUIET_LOGGERS and not ops.logger.isEnabledFor(logging.WARNING)
