"""The promotion gate on a real MLflow registry (SQLite store in a temp dir): aliases, recorded decisions,
rollback. Each test registers its own model name in one shared store (creating a store takes seconds)."""

from __future__ import annotations

import itertools
from pathlib import Path

import mlflow
import pytest

from loraflow.cli import main
from loraflow.config.promotion import PromotionConfig, Requirement
from loraflow.errors import LoraflowError
from loraflow.registry.promote import CHALLENGER, CHAMPION, TAG_DECISION, TAG_REASONS, judge, promote
from loraflow.registry.rollback import TAG_MOVED, rollback

POLICY = PromotionConfig(
    require=[
        Requirement(
            metric="perplexity", higher_is_better=False, min_gain_over_base=0.0, min_gain_over_champion=None
        ),
        Requirement(metric="tiny_kobest_copa/acc", min_gain_over_base=-0.05, min_gain_over_champion=0.0),
    ],
    max_perplexity_regression=0.05,
)
_names = itertools.count()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("promotion", artifact_location=(root / "artifacts").as_uri())
    return uri, experiment


@pytest.fixture
def client(store: tuple[str, str]) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=store[0], registry_uri=store[0])


@pytest.fixture
def model_name(client: mlflow.MlflowClient) -> str:
    name = f"tiny-ko-{next(_names)}"
    client.create_registered_model(name)
    return name


def metrics(ppl: float, acc: float, base_ppl: float = 70.0, base_acc: float = 0.5) -> dict[str, float]:
    return {
        "base/perplexity": base_ppl,
        "tuned/perplexity": ppl,
        "base/tiny_kobest_copa/acc": base_acc,
        "tuned/tiny_kobest_copa/acc": acc,
    }


def register(client: mlflow.MlflowClient, experiment: str, name: str, logged: dict[str, float]) -> str:
    """What the register step does: a run holding the metrics, and a version of its adapter directory."""
    run = client.create_run(experiment)
    for key, value in logged.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/adapter",
        run_id=run.info.run_id,
        description="LoRA adapter registered by loraflow.",
    )
    return str(version.version)


def aliases(client: mlflow.MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}


def test_first_passing_version_becomes_challenger(client, store, model_name) -> None:
    version = register(client, store[1], model_name, metrics(ppl=8.0, acc=0.55))
    decision = promote(client, model_name, version, metrics(ppl=8.0, acc=0.55), POLICY)
    assert decision.passed and decision.alias == CHALLENGER and decision.compared_with is None
    assert aliases(client, model_name) == {CHALLENGER: version}
    recorded = client.get_model_version(model_name, version)
    assert recorded.tags[TAG_DECISION] == CHALLENGER
    assert "pass: tiny_kobest_copa/acc 0.55 vs base 0.5" in recorded.tags[TAG_REASONS]
    assert recorded.description.startswith("LoRA adapter registered by loraflow.\n\nPromotion: challenger")


def test_worse_than_champion_gets_no_alias_and_the_champion_stays(client, store, model_name) -> None:
    champion = register(client, store[1], model_name, metrics(ppl=8.0, acc=0.60))
    client.set_registered_model_alias(model_name, CHAMPION, champion)  # a person chose it
    worse = metrics(ppl=8.1, acc=0.55)  # better than the base, worse than the champion on copa
    version = register(client, store[1], model_name, worse)
    decision = promote(client, model_name, version, worse, POLICY)
    assert not decision.passed and decision.alias is None and decision.compared_with == champion
    assert aliases(client, model_name) == {CHAMPION: champion}
    recorded = client.get_model_version(model_name, version)
    assert recorded.aliases == [] and recorded.tags[TAG_DECISION] == "rejected"
    assert f"fail: tiny_kobest_copa/acc 0.55 vs champion v{champion} 0.6" in recorded.tags[TAG_REASONS]
    assert "Promotion: rejected" in recorded.description


def test_better_than_champion_becomes_challenger_and_the_champion_stays(client, store, model_name) -> None:
    champion = register(client, store[1], model_name, metrics(ppl=8.0, acc=0.55))
    client.set_registered_model_alias(model_name, CHAMPION, champion)
    better = metrics(ppl=8.2, acc=0.60)  # perplexity within the 5% bound of the champion's
    version = register(client, store[1], model_name, better)
    decision = promote(client, model_name, version, better, POLICY)
    assert decision.passed and decision.alias == CHALLENGER
    assert aliases(client, model_name) == {CHAMPION: champion, CHALLENGER: version}


def test_auto_champion_moves_the_champion(client, store, model_name) -> None:
    policy = POLICY.model_copy(update={"auto_champion": True})
    first = register(client, store[1], model_name, metrics(ppl=8.0, acc=0.55))
    assert promote(client, model_name, first, metrics(ppl=8.0, acc=0.55), policy).alias == CHAMPION
    second = register(client, store[1], model_name, metrics(ppl=7.5, acc=0.60))
    decision = promote(client, model_name, second, metrics(ppl=7.5, acc=0.60), policy)
    assert decision.alias == CHAMPION and decision.compared_with == first
    assert aliases(client, model_name) == {CHAMPION: second}
    # A worse third version is rejected even under auto_champion; the champion does not move.
    third = register(client, store[1], model_name, metrics(ppl=9.0, acc=0.60))
    assert promote(client, model_name, third, metrics(ppl=9.0, acc=0.60), policy).alias is None
    assert aliases(client, model_name) == {CHAMPION: second}


def test_rollback_moves_the_champion_and_a_rerun_does_not_undo_it(client, store, model_name, capsys) -> None:
    policy = POLICY.model_copy(update={"auto_champion": True})
    first = register(client, store[1], model_name, metrics(ppl=8.0, acc=0.55))
    promote(client, model_name, first, metrics(ppl=8.0, acc=0.55), policy)
    second = register(client, store[1], model_name, metrics(ppl=7.5, acc=0.60))
    promote(client, model_name, second, metrics(ppl=7.5, acc=0.60), policy)

    assert main(["rollback", model_name, first, "--tracking-uri", store[0]]) == 0
    assert f"champion v{second} -> v{first}" in capsys.readouterr().out
    assert aliases(client, model_name) == {CHAMPION: first}
    moved = client.get_model_version(model_name, first).tags[TAG_MOVED]
    assert moved.startswith(f"champion moved here from v{second}")

    # The flow reruns with the same inputs: the version was decided already, so the person's rollback stands.
    again = promote(client, model_name, second, metrics(ppl=7.5, acc=0.60), policy)
    assert not again.decided_now and again.alias == CHAMPION
    assert aliases(client, model_name) == {CHAMPION: first}

    assert main(["versions", model_name, "--tracking-uri", store[0]]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown == [
        f"v{first}\taliases=champion\tdecision=champion",
        f"v{second}\taliases=-\tdecision=champion",
    ]
    assert main(["rollback", model_name, "99", "--tracking-uri", store[0]]) == 1
    assert "v99" in capsys.readouterr().err


def test_rollback_to_a_missing_version_fails_without_moving_anything(client, store, model_name) -> None:
    version = register(client, store[1], model_name, metrics(ppl=8.0, acc=0.55))
    rollback(client, model_name, version)
    with pytest.raises(LoraflowError, match="v7"):
        rollback(client, model_name, "7")
    assert aliases(client, model_name) == {CHAMPION: version}


def test_judge_checks_each_rule() -> None:
    passed, reasons = judge(POLICY, metrics(ppl=8.0, acc=0.46), champion=None)
    assert passed, reasons  # 0.04 below the base is inside the -0.05 tolerance
    passed, reasons = judge(POLICY, metrics(ppl=8.0, acc=0.44), champion=None)
    assert not passed and any(r.startswith("fail: tiny_kobest_copa/acc") for r in reasons)
    passed, reasons = judge(POLICY, metrics(ppl=80.0, acc=0.6), champion=None)
    assert not passed and sum(r.startswith("fail: perplexity") for r in reasons) == 2  # rule and bound
    passed, reasons = judge(POLICY, {"tuned/perplexity": 8.0, "base/perplexity": 70.0}, champion=None)
    assert not passed and "fail: tuned/tiny_kobest_copa/acc was not measured" in reasons
    # A champion evaluated before a metric was configured is not compared on it (noted, not failed).
    passed, reasons = judge(
        POLICY, metrics(ppl=8.0, acc=0.6), champion={"tuned/perplexity": 8.0}, champion_label="v1"
    )
    assert passed and "note: v1 has no tiny_kobest_copa/acc; not compared" in reasons
    passed, reasons = judge(POLICY, metrics(ppl=8.5, acc=0.6), champion={"tuned/perplexity": 8.0})
    assert not passed and any(r.startswith("fail: perplexity 8.5 vs champion 8") for r in reasons)


def test_repo_configs_policies() -> None:
    """The shipped policies: tiny-ko promotes automatically and passes on tiny-ko's measured scores; qwen-ko
    leaves the champion to a person."""
    from loraflow.config import load_config

    repo = Path(__file__).resolve().parent.parent
    tiny = load_config(repo / "configs" / "tiny-ko.yaml")
    qwen = load_config(repo / "configs" / "qwen-ko.yaml")
    assert tiny.promotion.auto_champion and not qwen.promotion.auto_champion
    measured = {
        "base/perplexity": 71.28,
        "tuned/perplexity": 7.83,  # a 2-epoch tiny-ko run, measured here
        "base/tiny_kobest_boolq/acc": 0.4167,
        "tuned/tiny_kobest_boolq/acc": 0.4167,
        "base/tiny_kobest_copa/acc": 0.5667,
        "tuned/tiny_kobest_copa/acc": 0.6333,
        "base/tiny_kobest_hellaswag/acc_norm": 0.6333,
        "tuned/tiny_kobest_hellaswag/acc_norm": 0.5833,
    }
    passed, reasons = judge(tiny.promotion, measured, champion=None)
    assert passed, reasons
    every_task = {rule.metric.split("/")[0] for rule in qwen.promotion.require} - {"perplexity"}
    assert every_task == set(qwen.eval.benchmarks.tasks)


def test_versions_shows_the_first_failing_requirement_of_a_rejected_version(client, store, model_name,
                                                                             capsys) -> None:
    version = register(client, store[1], model_name, metrics(ppl=90.0, acc=0.40))
    assert not promote(client, model_name, version, metrics(ppl=90.0, acc=0.40), POLICY).passed
    assert main(["versions", model_name, "--tracking-uri", store[0]]) == 0
    line = capsys.readouterr().out.strip()
    first_fail = next(r for r in client.get_model_version(model_name, version).tags[TAG_REASONS].splitlines()
                      if r.startswith("fail:"))
    assert line == f"v{version}\taliases=-\tdecision=rejected\treason={first_fail.removeprefix('fail:').strip()}"
    assert "perplexity" in line
