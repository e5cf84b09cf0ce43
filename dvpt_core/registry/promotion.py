"""Quality-gated promotion: should the challenger replace the champion?

Order of work, whichever way the decision goes:

1. read the challenger, the current champion (remembered for the compare-and-set) and both
   versions' per-sample test records;
2. refuse, naming both versions, when they were evaluated on other data (DVC hash) or other test
   samples, unless ``promotion.allow_different_data``;
3. bootstrap the primary metric's difference (``dvpt_core.registry.bootstrap``) and apply the
   rule (``decide``);
4. record the decision, figures and reason in an MLflow run and on both versions (tags, history
   events, model cards);
5. last, when promoted, move the alias with a compare-and-set (``history.move_alias``); if the
   champion moved meanwhile the decision is re-recorded as refused and nothing moves.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from dvpt_core.config import ExperimentConfig, PromotionConfig  # noqa: E402
from dvpt_core.metrics.per_sample import RecordsError, SampleRecords  # noqa: E402
from dvpt_core.registry.bootstrap import Comparison, Estimate, compare, estimate, metric_statistic  # noqa: E402
from dvpt_core.registry.history import (  # noqa: E402
    PREVIOUS_CHAMPION_TAG, ChampionMoved, move_alias, record_event, utc_now, version_number,
)
from dvpt_core.registry.model_card import publish_model_card  # noqa: E402
from dvpt_core.registry.versions import (  # noqa: E402
    RegistryError, VersionInfo, get_version, load_records, version_by_alias,
)
from dvpt_core.tracking import connect  # noqa: E402

log = logging.getLogger(__name__)
PROMOTED, REJECTED, REFUSED = "promoted", "rejected", "refused"
DECISION_FILE = "decision.json"
STAND_IN_NOTE = " (STAND-IN WEIGHTS: a demonstration backbone pre-trained here on synthetic data)"


class PromotionRefused(ValueError):
    """The two versions cannot be compared as asked (other data, missing records, stale champion)."""


@dataclass(frozen=True)
class Decision:
    outcome: str
    reason: str


def decide(challenger: VersionInfo, metric: str, own: Estimate, comparison: Comparison | None,
           settings: PromotionConfig) -> Decision:
    """The rule, as a pure function of the figures: RANDOM WEIGHTS never pass; the challenger's
    own metric must reach the floor; then, against a champion, the interval's lower bound must
    clear ``-margin`` (non-inferiority) or 0 (superiority)."""
    note = STAND_IN_NOTE if challenger.stand_in else ""
    if challenger.random_weights:
        return Decision(REJECTED, f"{challenger.label} has a backbone on RANDOM WEIGHTS: never promoted")
    if own.value < settings.floor:
        return Decision(REJECTED, f"{metric} {own.value:.4f} is below the floor {settings.floor}{note}")
    if comparison is None:
        return Decision(PROMOTED, f"first champion: {metric} {own.value:.4f} clears the floor "
                                  f"{settings.floor}{note}")
    d = comparison.difference
    threshold = -settings.margin if settings.rule == "non_inferiority" else 0.0
    figures = (f"{metric} {comparison.challenger.value:.4f} vs {comparison.champion.value:.4f}, difference "
               f"{d.value:+.4f}, {d.confidence:.0%} interval [{d.low:+.4f}, {d.high:+.4f}]"
               + ("" if comparison.paired else ", unpaired (different test data)"))
    rule = (f"non-inferiority margin {settings.margin}" if settings.rule == "non_inferiority" else "superiority")
    if d.low > threshold:
        return Decision(PROMOTED, f"{figures}: lower bound above {threshold:+.4f} ({rule}){note}")
    return Decision(REJECTED, f"{figures}: lower bound not above {threshold:+.4f} ({rule}){note}")


def promote(cfg: ExperimentConfig, version: str | None = None, why: str = "") -> dict:
    """Decide whether ``version`` (default: the version at ``tracking.alias``, the challenger)
    replaces the champion; see the module docstring. Returns the decision record; raises
    ``PromotionRefused`` (after recording it) when the comparison is refused."""
    connect(cfg)
    client = MlflowClient()
    settings = cfg.promotion
    name, alias = cfg.tracking.registered_model, settings.champion_alias
    challenger = _challenger(client, name, version, cfg.tracking.alias)
    champion = version_by_alias(client, name, alias)
    expected = version_number(champion)
    if champion is not None and champion.version == challenger.version:
        raise PromotionRefused(f"{challenger.label} is already @{alias}")
    try:
        records = load_records(challenger)
        own = estimate(records.scores(), metric_statistic(records.metric, records.num_classes), settings)
        comparison = None if champion is None else _compare(challenger, champion, records, settings)
    except (RecordsError, PromotionRefused) as err:
        _record(client, cfg, challenger, champion, Decision(REFUSED, str(err)), None, why)
        raise PromotionRefused(str(err)) from None
    decision = decide(challenger, records.metric, own, comparison, settings)
    result = _record(client, cfg, challenger, champion, decision, comparison, why, own)
    if decision.outcome == PROMOTED:
        try:
            move_alias(client, name, alias, challenger.version, expected, settings.lock_timeout_s)
        except ChampionMoved as err:
            stale = Decision(REFUSED, f"{err}: compare again with the new champion")
            _record(client, cfg, challenger, champion, stale, comparison, why, own)
            raise PromotionRefused(stale.reason) from None
        log.info("%s is now @%s: %s", challenger.label, alias, decision.reason)
    else:
        log.info("%s stays out of @%s: %s", challenger.label, alias, decision.reason)
    return result


def _challenger(client: MlflowClient, name: str, version: str | None, alias: str) -> VersionInfo:
    if version is not None:
        return get_version(client, name, version)
    found = version_by_alias(client, name, alias)
    if found is None:
        raise RegistryError(f"{name} has no @{alias}: register a version first or name one with --version")
    return found


def _compare(challenger: VersionInfo, champion: VersionInfo, records: SampleRecords,
             settings: PromotionConfig) -> Comparison:
    """The paired comparison on common test samples, or unpaired when allowed and the data differ."""
    theirs = load_records(champion)
    problems = []
    if challenger.data_hash != champion.data_hash:
        problems.append(f"data: DVC hash {challenger.data_hash} ({challenger.label}) vs {champion.data_hash} "
                        f"({champion.label})")
    try:
        paired = theirs.aligned_to(records)
    except RecordsError as err:
        problems.append(f"test samples: {err}")
        paired = None
    if problems and not settings.allow_different_data:
        raise PromotionRefused(
            f"refusing to compare {challenger.label} with champion {champion.label}: they were not evaluated on "
            f"the same test data ({'; '.join(problems)}). Re-evaluate on common data, or set "
            "promotion.allow_different_data=true (--allow-different-data) to compare them unpaired"
        )
    if records.task != theirs.task or records.class_names != theirs.class_names:
        raise PromotionRefused(f"{challenger.label} ({records.task}, {list(records.class_names)}) and "
                               f"{champion.label} ({theirs.task}, {list(theirs.class_names)}) do not do the same task")
    statistic = metric_statistic(records.metric, records.num_classes)
    if paired is not None and not problems:
        return compare(records.metric, records.scores(), paired.scores(), statistic, settings, paired=True)
    return compare(records.metric, records.scores(), theirs.scores(), statistic, settings, paired=False)


def _record(client: MlflowClient, cfg: ExperimentConfig, challenger: VersionInfo, champion: VersionInfo | None,
            decision: Decision, comparison: Comparison | None, why: str, own: Estimate | None = None) -> dict:
    """The decision in an MLflow run, as tags and history on both versions, and in their cards."""
    settings = cfg.promotion
    at = utc_now().isoformat(timespec="seconds")
    result = {
        "registered_model": challenger.name, "challenger": challenger.version,
        "champion_before": champion.version if champion else None, "decision": decision.outcome,
        "reason": decision.reason, "at": at, "rule": settings.rule, "margin": settings.margin,
        "floor": settings.floor, "alias": settings.champion_alias,
        "challenger_metric": own.as_dict() if own else None,
        "comparison": comparison.as_dict() if comparison else None,
        "random_weights": challenger.random_weights, "stand_in_weights": challenger.stand_in,
    }
    run_id = _log_run(cfg, challenger, champion, result, comparison)
    result["run_id"] = run_id
    difference = "" if comparison is None else (
        f"{comparison.difference.value:+.4f} {comparison.metric} [{comparison.difference.low:+.4f}, "
        f"{comparison.difference.high:+.4f}]")
    tags = {"promotion.decision": decision.outcome, "promotion.reason": decision.reason[:5000],
            "promotion.compared_with": champion.version if champion else "none", "promotion.difference": difference,
            "promotion.run_id": run_id, "promotion.at": at}
    for key, value in tags.items():
        client.set_model_version_tag(challenger.name, challenger.version, key, value)
    if decision.outcome == PROMOTED:
        client.set_model_version_tag(challenger.name, challenger.version, PREVIOUS_CHAMPION_TAG,
                                     champion.version if champion else "none")
    other = {"other_version": champion.version} if champion else {}
    record_event(client, challenger, decision.outcome, why or decision.reason, run_id=run_id, **other)
    concerned = [challenger]
    if champion is not None:
        action = {PROMOTED: "replaced", REJECTED: "kept"}.get(decision.outcome, "unchanged")
        record_event(client, champion, action, why or decision.reason, run_id=run_id,
                     other_version=challenger.version)
        concerned.append(champion)
    for info in concerned:
        publish_model_card(client, get_version(client, info.name, info.version), settings)
    return result


def _log_run(cfg: ExperimentConfig, challenger: VersionInfo, champion: VersionInfo | None, result: dict,
             comparison: Comparison | None) -> str:
    """One MLflow run per decision: the rule as parameters, the figures as metrics, the decision
    and reason as tags, ``decision.json`` and the bootstrap distribution as artifacts."""
    settings = cfg.promotion
    name = f"promote-{challenger.name}-v{challenger.version}"
    with mlflow.start_run(run_name=name, tags={"dvpt.step": "promote", "decision": result["decision"],
                                               "registered_model": challenger.name,
                                               "challenger": challenger.version,
                                               "champion": champion.version if champion else "none"}) as run:
        mlflow.log_params({f"promotion.{k}": v for k, v in settings.model_dump().items()})
        mlflow.set_tag("reason", result["reason"][:5000])
        if comparison is not None:
            mlflow.log_metrics({"challenger": comparison.challenger.value, "champion": comparison.champion.value,
                                "difference": comparison.difference.value, "difference_low": comparison.difference.low,
                                "difference_high": comparison.difference.high})
        elif result["challenger_metric"]:
            mlflow.log_metrics({"challenger": result["challenger_metric"]["value"]})
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / DECISION_FILE
            path.write_text(json.dumps({**result, "run_id": run.info.run_id}, indent=2))
            mlflow.log_artifact(str(path))
            if comparison is not None:
                mlflow.log_artifact(str(_plot(comparison, settings, Path(tmp) / "bootstrap.png")))
    return run.info.run_id


def _plot(comparison: Comparison, settings: PromotionConfig, path: Path) -> Path:
    """The bootstrap distribution of the difference, its interval and the rule's threshold."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(comparison.distribution, bins=50, color="#8fb3d9")
    d = comparison.difference
    for x, style, label in ((d.low, "--", "interval"), (d.high, "--", None), (d.value, "-", "difference")):
        ax.axvline(x, color="#1f4e79", linestyle=style, label=label)
    threshold = -settings.margin if settings.rule == "non_inferiority" else 0.0
    ax.axvline(threshold, color="#c0392b", label=f"threshold ({settings.rule})")
    ax.set_xlabel(f"{comparison.metric}: challenger - champion")
    ax.set_ylabel("resamples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
