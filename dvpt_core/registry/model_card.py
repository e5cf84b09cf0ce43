"""The model card of a registered version: Markdown, logged to the version's run and shown as the
version's description in the registry.

Everything on it is read back from the registry (the version's lineage tags, its run's metrics,
its per-sample test records, its decisions and history), so the card can be rebuilt at any time
and always says what the registry says. It is rebuilt whenever a decision concerns the version.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from mlflow.tracking import MlflowClient

from dvpt_core.config import PromotionConfig
from dvpt_core.metrics.per_sample import RecordsError, SampleRecords
from dvpt_core.models.backbone import RANDOM_WEIGHTS_WARNING, STAND_IN_WARNING
from dvpt_core.registry.bootstrap import Estimate, estimate, metric_statistic
from dvpt_core.registry.history import events
from dvpt_core.registry.versions import VersionInfo, load_records, run_metrics

log = logging.getLogger(__name__)
CARD_ARTIFACT_DIR = "model_card"
# Registry stores may cap a version's description (MLflow's SQL schema: 5,000 characters).
MAX_DESCRIPTION = 5000
DECISION_TAGS = ("promotion.decision", "promotion.reason", "promotion.compared_with", "promotion.difference",
                 "promotion.run_id", "promotion.at")
HISTORY_LINES = 8


def card_artifact(version: str) -> str:
    return f"{CARD_ARTIFACT_DIR}/version-{version}.md"


def render_model_card(info: VersionInfo, metrics: dict[str, float], records: SampleRecords | None,
                      settings: PromotionConfig) -> str:
    """The card as Markdown (under ``MAX_DESCRIPTION`` characters unless the history is long)."""
    t = info.tags
    lines = [f"# {info.name} version {info.version}", ""]
    if info.random_weights:
        lines += [f"> **WARNING: {RANDOM_WEIGHTS_WARNING.format(name=t.get('backbone', '?'), seed='?')}**. "
                  "This version is never promoted.", ""]
    elif info.stand_in:
        lines += [f"> **WARNING: {STAND_IN_WARNING.format(name=t.get('backbone', '?'), file='its weights file')}**.",
                  ""]
    created = datetime.fromtimestamp(info.created_ms / 1000, timezone.utc).isoformat(timespec="seconds")
    lines += [
        f"Aliases: {', '.join('@' + a for a in info.aliases) or 'none'}. Registered {created} from run "
        f"`{info.run_id}`.", "",
        "## Lineage", "",
        f"- Data: DVC hash `{info.data_hash}` (`data.dvc`)" + (
            f"; DVC experiment `{t['dvc_experiment']}`" if t.get("dvc_experiment") else ""),
        f"- Code: git commit `{t.get('git_commit', 'unknown')}`",
        f"- Splits file: `runs:/{info.run_id}/data/splits.csv`",
    ]
    if records is not None:
        lines.append(f"- Test set: {len(records.table)} {records.split} samples, digest `{records.digest()[:16]}`")
    lines += [
        "", "## Model", "",
        f"- Backbone: `{t.get('backbone', '?')}`, frozen, weights {_weights(info)}",
        f"- Backbone fingerprint (SHA-256 of its weights): `{t.get('backbone_fingerprint', '?')}`",
        f"- Method: `{t.get('method', '?')}`; trainable parameters {_count(metrics.get('params_trainable'))} of "
        f"{_count(metrics.get('params_total'))}; adapter file {_count(metrics.get('adapter_bytes'))} bytes",
        f"- ONNX graph (backbone + adapter): `{t.get('onnx_model_uri', 'none')}`",
        "", "## Evaluation", "",
    ]
    lines += _metrics_table(metrics, records, settings)
    lines += ["", "## Promotion", ""] + _decision(info) + _history(info)
    lines += ["", "## Intended use and limitations", "", *_intended_use(info, records)]
    return "\n".join(lines) + "\n"


def publish_model_card(client: MlflowClient, info: VersionInfo, settings: PromotionConfig | None = None) -> str:
    """Render the card, log it to the version's run and make it the version's description."""
    settings = settings or PromotionConfig()
    try:
        records = load_records(info)
    except RecordsError as err:
        log.warning("model card of %s without confidence intervals: %s", info.label, err)
        records = None
    card = render_model_card(info, run_metrics(client, info), records, settings)
    if info.run_id:
        client.log_text(info.run_id, card, card_artifact(info.version))
    description = card if len(card) <= MAX_DESCRIPTION else (
        card[: MAX_DESCRIPTION - 200] + f"\n\n(truncated: the whole card is `runs:/{info.run_id}/"
        f"{card_artifact(info.version)}`)\n")
    client.update_model_version(info.name, info.version, description=description)
    return card


def _weights(info: VersionInfo) -> str:
    if info.random_weights:
        return "**RANDOM** (randomly initialised)"
    if info.stand_in:
        return "**STAND-IN** (pre-trained here on a synthetic source task)"
    return "pretrained"


def _count(value: float | None) -> str:
    return "?" if value is None else f"{int(value):,}"


def _metrics_table(metrics: dict[str, float], records: SampleRecords | None, settings: PromotionConfig) -> list[str]:
    """Test metrics with bootstrap intervals from the per-sample records where they exist."""
    rows = ["| metric (test) | value | " + f"{settings.confidence:.0%} bootstrap interval |", "|---|---|---|"]
    intervals: dict[str, Estimate] = {}
    if records is not None:
        statistic = metric_statistic(records.metric, records.num_classes)
        intervals[records.metric] = estimate(records.scores(), statistic, settings)
        if records.task == "classification":
            correct = (records.table["label"] == records.table["pred"]).to_numpy(float)
            intervals["accuracy"] = estimate(correct, metric_statistic("accuracy", 0), settings)
    names = list(intervals) + sorted(k.removeprefix("test_") for k in metrics if k.startswith("test_")
                                     and k.removeprefix("test_") not in {*intervals, "samples"})
    for name in names:
        if name in intervals:
            e = intervals[name]
            rows.append(f"| {name} | {e.value:.4f} | [{e.low:.4f}, {e.high:.4f}] |")
        else:
            rows.append(f"| {name} | {metrics[f'test_{name}']:.4f} | |")
    if len(rows) == 2:
        return ["No test metrics recorded."]
    if records is not None:
        rows.append(f"\nIntervals: {settings.resamples} bootstrap resamples of the {len(records.table)} "
                    f"{records.split} samples, seed {settings.seed}.")
    return rows


def _decision(info: VersionInfo) -> list[str]:
    t = info.tags
    if "promotion.decision" not in t:
        return ["No promotion decision yet."]
    lines = [f"- Decision: **{t['promotion.decision']}** ({t.get('promotion.at', '?')}), compared with version "
             f"{t.get('promotion.compared_with', 'none')}"]
    if t.get("promotion.difference"):
        lines.append(f"- Difference (challenger - champion): {t['promotion.difference']}")
    lines.append(f"- Reason: {t.get('promotion.reason', '')}")
    if t.get("promotion.run_id"):
        lines.append(f"- Decision run: `{t['promotion.run_id']}`")
    return lines


def _history(info: VersionInfo) -> list[str]:
    story = events(info)
    if not story:
        return []
    lines = ["", "History (newest last):", ""]
    if len(story) > HISTORY_LINES:
        lines.append(f"- ... {len(story) - HISTORY_LINES} earlier events in the version's `history.*` tags")
    for event in story[-HISTORY_LINES:]:
        other = event.get("other_version") or event.get("to_version") or event.get("from_version") or ""
        lines.append(f"- {event['at']} {event['action']}" + (f" (version {other})" if other else "")
                     + f" by {event['by']}: {event['why']}")
    return lines


def _intended_use(info: VersionInfo, records: SampleRecords | None) -> list[str]:
    classes = f" over the classes {', '.join(records.class_names)}" if records is not None else ""
    task = records.task if records is not None else "image analysis"
    lines = [
        f"- Intended use: research on parameter-efficient adaptation for medical imaging ({task}{classes}); "
        "a decision aid to be validated locally, not a medical device.",
        "- Inputs: images like the training data (same modality, acquisition and preprocessing); the model "
        "resizes and normalises them itself. Performance on other populations, devices or sites is unknown.",
        "- The interval above covers sampling of the test set only, not shifts between sites or over time.",
    ]
    if info.random_weights:
        lines.append("- **RANDOM WEIGHTS: this version exists to test the pipeline; its outputs mean nothing.**")
    elif info.stand_in:
        lines.append("- **STAND-IN WEIGHTS: the backbone was pre-trained here on synthetic data; this version "
                     "demonstrates the workflow and is not fit for any clinical or scientific conclusion.**")
    return lines
