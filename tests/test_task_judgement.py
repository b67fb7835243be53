"""A job is judged by its task unless told otherwise: the default gate of a held-out task, the hint that a label set
could be, the warnings of a loss that does not fall, and confusion matrices whose axes name the labels in Korean."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from loraflow.config.loader import read_yaml, validate_config
from loraflow.data.summary import heldout_hint
from loraflow.evaluation.labels import OTHER, confusion_figure, label_font, label_metrics
from loraflow.registry.promote import judge
from loraflow.training.loss_check import loss_warning

INTENT = "configs/tiny-intent.yaml"


def _intent_without_require(**heldout: object) -> dict:
    raw = read_yaml(INTENT)
    del raw["promotion"]["require"]
    raw["eval"]["heldout"].update(heldout)
    return raw


def test_a_held_out_label_task_is_gated_on_accuracy_by_default() -> None:
    job = validate_config(_intent_without_require())
    assert [r.metric for r in job.promotion.require] == ["heldout/accuracy"]
    # The version: accuracy 0.00 like the base, perplexity better; it must not become challenger.
    metrics = {"base/heldout/accuracy": 0.0, "tuned/heldout/accuracy": 0.0, "base/perplexity": 9.0,
               "tuned/perplexity": 3.0}
    passed, reasons = judge(job.promotion, metrics, None)
    assert not passed and any(r.startswith("fail: heldout/accuracy 0 vs base 0") for r in reasons)
    passed, _ = judge(job.promotion, {**metrics, "tuned/heldout/accuracy": 0.5}, {"tuned/heldout/accuracy": 0.6})
    assert not passed  # below the champion
    passed, _ = judge(job.promotion, {**metrics, "tuned/heldout/accuracy": 0.6}, {"tuned/heldout/accuracy": 0.6})
    assert passed


def test_the_default_gate_follows_the_kind_and_yields_to_a_given_one() -> None:
    assert [r.metric for r in validate_config(_intent_without_require(kind="text")).promotion.require] == [
        "heldout/chrf"]
    assert validate_config(_intent_without_require(enabled=False)).promotion.require == []
    raw = _intent_without_require()
    raw["promotion"]["require"] = []  # said explicitly: no requirement
    assert validate_config(raw).promotion.require == []
    # The job a run records (its dump) validates to the same gate.
    job = validate_config(_intent_without_require())
    assert validate_config(job.model_dump(mode="json")).promotion == job.promotion


def test_a_label_set_without_held_out_scoring_gets_a_hint() -> None:
    from loraflow.config.evaluation import HeldoutConfig

    stats = {"train_rows": 370, "eval_rows": 30, "distinct_answers": 10}
    hint = heldout_hint(stats, HeldoutConfig())
    assert hint is not None and "10 distinct answers over 400 rows" in hint
    assert heldout_hint(stats, HeldoutConfig(enabled=True)) is None
    assert heldout_hint({**stats, "distinct_answers": 390}, HeldoutConfig()) is None  # a chat dataset


def test_a_loss_that_does_not_fall_warns() -> None:
    flat = [{"step": 5, "loss": 7.3}, {"step": 10, "loss": 7.2}, {"step": 20, "loss": 7.16}]
    warning = loss_warning(flat)
    assert warning is not None and "7.3 at step 5, 7.16 at step 20" in warning
    assert loss_warning([{"step": 5, "loss": 7.3}, {"step": 20, "loss": 3.1}]) is None
    assert loss_warning([{"step": 5, "loss": 7.3}, {"train_loss": 7.2}]) is None  # one point: nothing to compare


def test_the_confusion_matrix_names_korean_labels_with_a_font_that_has_them(tmp_path: Path) -> None:
    labels = ["카드도착", "배송기간", "환율"]
    pairs = [("카드도착", "카드도착"), ("배송기간", "카드도착"), ("환율", "환율")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font(s)" for every box it draws
        _, files = label_metrics(pairs, labels, tmp_path, "tuned")
    assert (tmp_path / "tuned.heldout_confusion.png").stat().st_size > 1000 and len(files) == 4
    axes = confusion_figure(np.eye(3, 4, dtype=int), [*labels, OTHER], "tuned").axes[0]
    assert [tick.get_text() for tick in axes.get_xticklabels()] == [*labels, OTHER]
    assert [tick.get_text() for tick in axes.get_yticklabels()] == labels
    assert all(tick.get_fontproperties().get_file() == str(label_font()) for tick in axes.get_xticklabels())


def test_the_label_font_has_hangul_where_matplotlibs_own_has_none() -> None:
    import matplotlib
    from matplotlib.ft2font import FT2Font

    assert all(FT2Font(str(label_font())).get_char_index(ord(char)) for char in "카드도착 card_arrival")
    bundled = FT2Font(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"))
    assert not any(bundled.get_char_index(ord(char)) for char in "카드도착")
