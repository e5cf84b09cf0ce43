"""``dvpt registry``: every version of the registered model with its aliases, lineage, test
metrics and last promotion decision, as rows (JSON) or a text table."""

from __future__ import annotations

from datetime import datetime, timezone

from mlflow.tracking import MlflowClient

from dvpt_core.config import ExperimentConfig
from dvpt_core.registry.history import events
from dvpt_core.registry.versions import all_versions, run_metrics
from dvpt_core.tracking import connect

COLUMNS = ("version", "aliases", "created", "method", "weights", "data", "test_kappa", "test_accuracy",
           "decision", "last_event")
REASON_WIDTH = 70
WEIGHTS = {"RANDOM WEIGHTS": "RANDOM", "STAND-IN WEIGHTS": "stand-in"}


def registry_rows(cfg: ExperimentConfig) -> dict:
    connect(cfg)
    client = MlflowClient()
    name = cfg.tracking.registered_model
    rows = []
    for info in all_versions(client, name):
        metrics = run_metrics(client, info)
        story = events(info)
        last = story[-1] if story else None
        rows.append({
            "version": info.version,
            "aliases": ",".join("@" + a for a in info.aliases),
            "created": datetime.fromtimestamp(info.created_ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "method": info.tags.get("method", "?"),
            "weights": WEIGHTS.get(info.weights_label, "pretrained"),
            "data": info.data_hash[:8],
            "test_kappa": metrics.get("test_kappa"),
            "test_accuracy": metrics.get("test_accuracy"),
            "decision": info.tags.get("promotion.decision", ""),
            "reason": info.tags.get("promotion.reason", ""),
            "last_event": f"{last['at']} {last['action']} by {last['by']}" if last else "",
        })
    return {"registered_model": name, "versions": rows}


def registry_text(result: dict) -> str:
    """A fixed-width table, then each decided version's reason below it."""
    rows = result["versions"]
    if not rows:
        return f"{result['registered_model']}: no versions"
    cells = [[_cell(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
    lines = [result["registered_model"], "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    reasons = [f"  v{row['version']}: {_short(row['reason'])}" for row in rows if row["reason"]]
    return "\n".join(lines + (["", "decisions:", *reasons] if reasons else []))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _short(text: str) -> str:
    return text if len(text) <= REASON_WIDTH * 2 else text[: REASON_WIDTH * 2 - 3] + "..."
