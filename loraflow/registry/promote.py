"""promote: the gate between a registered adapter version and the aliases that serve it.

A version that passes the job's policy (against the base and the current champion) gets alias `challenger`,
or `champion` when the policy says `auto_champion`; a failing version keeps no alias. The decision and its
reasons are recorded on the version (tags `promotion.*` and its description). One decision per version: a
rerun on an already decided version changes nothing, so a rerun never undoes a person's alias change.

Nothing here takes `champion` away from a version: a person moves it (the MLflow UI, `loraflow promote`,
`loraflow rollback`; see loraflow/registry/rollback.py).
"""

from __future__ import annotations

import math

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict

from loraflow.config.promotion import PromotionConfig

CHAMPION = "champion"
CHALLENGER = "challenger"
REJECTED = "rejected"
TAG_DECISION = "promotion.decision"  # champion | challenger | rejected
TAG_REASONS = "promotion.reasons"
TAG_COMPARED_WITH = "promotion.compared_with"  # the champion version at decision time, or "none"
TAG_VALUE_LIMIT = 5000  # MLflow's bound on a model version tag value
# Metrics are floats logged and read back; a gain equal to the bound must pass despite rounding.
EPSILON = 1e-9


class PromotionDecision(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    passed: bool
    alias: str | None  # the alias this decision gave the version
    compared_with: str | None  # champion version compared against
    reasons: list[str]
    decided_now: bool  # False: the version had been decided before; nothing changed


def judge(policy: PromotionConfig, metrics: dict[str, float], champion: dict[str, float] | None,
          champion_label: str = "champion") -> tuple[bool, list[str]]:
    """Apply the policy. `metrics` are the candidate's (`base/...`, `tuned/...`, and `start/...` for a job that
    started from a version); `champion` the champion's, or None when there is none. Returns (passed, one line per
    check starting `pass:`, `fail:` or `note:`)."""
    reasons: list[str] = []

    def check(ok: bool, text: str) -> None:
        reasons.append(f"{'pass' if ok else 'fail'}: {text}")

    for req in policy.require:
        tuned = metrics.get(f"tuned/{req.metric}")
        if tuned is None:
            check(False, f"tuned/{req.metric} was not measured")
            continue
        sign = 1.0 if req.higher_is_better else -1.0
        if req.min_value is not None:
            bound = ">=" if req.higher_is_better else "<="
            check(sign * (tuned - req.min_value) >= -EPSILON, f"{req.metric} {tuned:.4g} {bound} {req.min_value:g}")
        tuned_se = metrics.get(f"tuned/{req.metric}_stderr", 0.0)
        sides = [(side, metrics.get(f"{side}/{req.metric}"), metrics.get(f"{side}/{req.metric}_stderr", 0.0), gain)
                 for side, gain in (("base", req.min_gain_over_base), ("start", req.min_gain_over_start))]
        if champion is not None:
            sides.append((champion_label, champion.get(f"tuned/{req.metric}"),
                          champion.get(f"tuned/{req.metric}_stderr", 0.0), req.min_gain_over_champion))
        for side, reference, reference_se, min_gain in sides:
            if min_gain is None:
                continue
            if reference is None:
                if side in ("base", "start"):
                    check(False, f"{side}/{req.metric} was not measured")
                else:  # e.g. a task added to the config after the champion was evaluated
                    reasons.append(f"note: {side} has no {req.metric}; not compared")
                continue
            gain = sign * (tuned - reference)
            # Two scores on the same items each carry lm-eval's standard error; their difference one of ~sqrt(2)x.
            slack = req.stderr_tolerance * math.hypot(tuned_se, reference_se)
            need = f"need >= {min_gain:+.4g}" + (f" - {slack:.4g} ({req.stderr_tolerance:g} s.e.)" if slack else "")
            check(gain >= min_gain - slack - EPSILON, f"{req.metric} {tuned:.4g} vs {side} {reference:.4g}: "
                                                      f"gain {gain:+.4g}, {need}")

    bound = policy.max_perplexity_regression
    tuned_ppl = metrics.get("tuned/perplexity")
    if bound is not None and tuned_ppl is not None:
        references = [("base", metrics.get("base/perplexity"))]
        if champion is not None:
            references.append((champion_label, champion.get("tuned/perplexity")))
        for side, reference in references:
            if reference is not None:
                limit = reference * (1 + bound)
                check(tuned_ppl <= limit + EPSILON,
                      f"perplexity {tuned_ppl:.4g} vs {side} {reference:.4g}: at most {limit:.4g} allowed")
    passed = not any(line.startswith("fail:") for line in reasons)
    if not reasons:
        reasons.append("note: the policy has no checks")
    return passed, reasons


def champion_version(client: MlflowClient, model_name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


def version_metrics(client: MlflowClient, version: ModelVersion) -> dict[str, float] | None:
    """The metrics of the run that registered a version; None when the run is gone."""
    if not version.run_id:
        return None
    try:
        return dict(client.get_run(version.run_id).data.metrics)
    except MlflowException:
        return None


def _recorded(version: ModelVersion) -> PromotionDecision:
    decision = version.tags[TAG_DECISION]
    compared = version.tags.get(TAG_COMPARED_WITH, "none")
    return PromotionDecision(
        model_name=version.name, version=str(version.version), passed=decision != REJECTED,
        alias=None if decision == REJECTED else decision,
        compared_with=None if compared == "none" else compared,
        reasons=version.tags.get(TAG_REASONS, "").splitlines(), decided_now=False)


def _describe(previous: str | None, decision: str, reasons: list[str]) -> str:
    # Replace an earlier promotion section (none expected) but keep what the register step wrote.
    kept = (previous or "").split("\n\nPromotion:")[0].rstrip()
    section = f"Promotion: {decision}\n" + "\n".join(f"- {line}" for line in reasons)
    return f"{kept}\n\n{section}" if kept else section


def promote(client: MlflowClient, model_name: str, version: str | int, metrics: dict[str, float],
            policy: PromotionConfig) -> PromotionDecision:
    """Decide on a freshly registered version and record the decision on it (see the module doc)."""
    candidate = client.get_model_version(model_name, str(version))
    if TAG_DECISION in candidate.tags:
        return _recorded(candidate)
    number = str(candidate.version)  # the registry returns versions as ints, takes and shows strings
    champion = champion_version(client, model_name)
    champion_number = str(champion.version) if champion is not None else None
    if champion_number == number:
        passed, reasons, alias = True, ["note: already champion (set before the gate ran)"], CHAMPION
    else:
        champion_metrics = None
        label = "champion"
        if champion is not None:
            label = f"champion v{champion_number}"
            champion_metrics = version_metrics(client, champion)
            if champion_metrics is None:
                champion_metrics = {}
                label += " (run not found)"
        passed, reasons = judge(policy, metrics, champion_metrics, label)
        alias = (CHAMPION if policy.auto_champion else CHALLENGER) if passed else None
        if alias is not None:
            client.set_registered_model_alias(model_name, alias, number)
    decision = alias or REJECTED
    compared_with = champion_number if champion_number != number else None
    tags = {TAG_DECISION: decision, TAG_REASONS: "\n".join(reasons)[:TAG_VALUE_LIMIT],
            TAG_COMPARED_WITH: compared_with or "none"}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, number, key, value)
    description = _describe(candidate.description, decision, reasons)
    client.update_model_version(model_name, number, description=description)
    return PromotionDecision(model_name=model_name, version=number, passed=passed,
                             alias=alias, compared_with=compared_with, reasons=reasons, decided_now=True)
