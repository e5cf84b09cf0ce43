"""Compare step: one experiment run as a grid of cells (method x seed x label ratio), aggregated
into one report of the task's test metrics per method and label ratio (``Task.comparison_metrics``:
kappa and accuracy for classification; Dice, IoU and HD95 for segmentation), ranked by the task's
selection metric (kappa, Dice).

The grid's cells are ordinary runs of the train and evaluate steps, each with its own
configuration (:func:`cell_config`), so a comparison exercises exactly what a single run does.
The report is built from what those runs logged to MLflow (parameters, ``params_trainable``,
``test_<metric>``), the one record every cell is guaranteed to have written, whichever way it
ran: the quality benchmark in one process, or the Kubeflow comparison pipeline with one pod per
task. Every list of metrics below is the task's, its selection metric first. The report lands in
``out_dir`` (``comparison.json``, ``comparison.md``, ``comparison.png``, ``report.html``) and in a
parent MLflow run named ``comparison``, under which the cell runs are nested.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, get_args

import mlflow
from mlflow.tracking import MlflowClient

from dvpt_core.config import ExperimentConfig, ModelConfig, apply_overrides
from dvpt_core.tasks import get_task
from dvpt_core.tracking import connect, read_run_file

log = logging.getLogger(__name__)

COMPARISON_RUN = "comparison"
SPLIT = "test"
REPORT_FILE = "report.html"
RESULT_FILE = "comparison.json"
# The default grid: every method the schema knows, 3 seeds, 10/20/40/100% of the labels.
ALL_METHODS: list[str] = list(get_args(ModelConfig.model_fields["method"].annotation))
DEFAULT_SEEDS = [0, 1, 2]
DEFAULT_RATIOS = [0.1, 0.2, 0.4, 1.0]


def expand_grid(
    methods: Sequence[str],
    seeds: Sequence[int],
    label_ratios: Sequence[float],
    method_overrides: dict[str, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """Every (method, seed, label ratio) cell as a JSON-ready dict, with the method's own
    ``KEY=VALUE`` overrides (e.g. a lower learning rate for full fine-tuning) carried along."""
    method_overrides = method_overrides or {}
    return [
        {"method": method, "seed": int(seed), "label_ratio": float(ratio),
         "overrides": list(method_overrides.get(method, []))}
        for ratio in label_ratios for seed in seeds for method in methods
    ]


def parse_method_overrides(items: Sequence[str], methods: Sequence[str]) -> dict[str, list[str]]:
    """``METHOD:KEY=VALUE`` items (the ``--method-set`` flags) as ``expand_grid``'s per-method overrides."""
    overrides: dict[str, list[str]] = {}
    for item in items:
        method, sep, override = item.partition(":")
        if not sep or method not in methods:
            raise ValueError(f"method override {item!r}: expected METHOD:KEY=VALUE with METHOD one of {list(methods)}")
        overrides.setdefault(method, []).append(override)
    return overrides


def cell_config(cfg: ExperimentConfig, cell: dict[str, Any]) -> ExperimentConfig:
    """``cfg`` with one cell applied: its method overrides, then its method, seed and ratio.

    A seed is one repetition of the experiment, so it sets both the training seed and
    ``data.label_seed``: each seed draws its own labelled subset (nested across ratios), and the
    spread over seeds covers which images were labelled as well as the training noise. The
    splits themselves (``data.split_seed``) stay the configuration's, so every cell is scored on
    the same test samples and one preprocessed cache serves the whole grid.
    """
    overrides = [
        *cell.get("overrides", []),
        f"model.method={cell['method']}",
        f"train.seed={int(cell['seed'])}",
        f"data.label_seed={int(cell['seed'])}",
        f"data.label_ratio={cell['label_ratio']}",
    ]
    return ExperimentConfig.from_json(json.dumps(apply_overrides(cfg.model_dump(mode="json"), overrides)))


def cell_rows(client: MlflowClient, run_ids: Iterable[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per cell from its MLflow run: what it was (method, seed, ratio, trainable
    parameters) and how it scored on the test split."""
    rows = []
    for run_id in run_ids:
        run = client.get_run(run_id)
        params, logged = run.data.params, run.data.metrics
        missing = [f"{SPLIT}_{m}" for m in metrics if f"{SPLIT}_{m}" not in logged]
        if missing:
            raise ValueError(f"MLflow run {run_id} has no {', '.join(missing)}: was it evaluated?")
        rows.append({
            "run_id": run_id,
            "method": params["model.method"],
            "seed": int(params["train.seed"]),
            "label_ratio": float(params["data.label_ratio"]),
            "trainable": int(logged["params_trainable"]),
            "random_weights": run.data.tags.get("random_weights") == "true",
            **{m: logged[f"{SPLIT}_{m}"] for m in metrics},
        })
    return rows


def summarise(rows: list[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation over seeds, per (method, label ratio); methods in
    their first-seen order, ratios ascending. One seed gives a standard deviation of 0."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["label_ratio"]), []).append(row)
    methods = list(dict.fromkeys(row["method"] for row in rows))
    summary = []
    for method, ratio in sorted(groups, key=lambda key: (methods.index(key[0]), key[1])):
        cells = groups[method, ratio]
        entry: dict[str, Any] = {"method": method, "label_ratio": ratio, "n": len(cells),
                                 "trainable": cells[0]["trainable"]}
        for metric in metrics:
            values = [c[metric] for c in cells]
            entry[f"{metric}_mean"] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def rank(summary: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Methods by ``metric``'s (higher is better: kappa, Dice) mean over seeds, averaged over the
    label ratios (each ratio weighs the same), best first; its value at the largest ratio beside it."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for entry in summary:
        by_method.setdefault(entry["method"], []).append(entry)
    ranking = [
        {"method": method, "trainable": entries[0]["trainable"],
         f"{metric}_mean_over_ratios": statistics.fmean(e[f"{metric}_mean"] for e in entries),
         f"{metric}_at_max_ratio": max(entries, key=lambda e: e["label_ratio"])[f"{metric}_mean"]}
        for method, entries in by_method.items()
    ]
    ranking.sort(key=lambda r: r[f"{metric}_mean_over_ratios"], reverse=True)
    return [{"rank": i, **r} for i, r in enumerate(ranking, start=1)]


def scores(summary: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, float]:
    """The summary as flat metric names (``<method>_r<ratio>_<metric>_<mean|std>``) for MLflow and KFP."""
    return {f"{e['method']}_r{e['label_ratio']:g}_{metric}_{stat}": e[f"{metric}_{stat}"]
            for e in summary for metric in metrics for stat in ("mean", "std")}


Table = tuple[list[str], list[list[str]]]


def table(summary: list[dict[str, Any]], ranking: list[dict[str, Any]], metrics: Sequence[str]) -> Table:
    """Header and rows (strings): per method, its rank, trainable parameters and
    ``mean ± std`` of each metric at each label ratio, in ranking order."""
    ratios = sorted({e["label_ratio"] for e in summary})
    cells = {(e["method"], e["label_ratio"]): e for e in summary}
    header = ["rank", "method", "trainable"] + [f"{m} @ {r:.0%}" for m in metrics for r in ratios]
    rows = []
    for r in ranking:
        row = [str(r["rank"]), r["method"], f"{r['trainable']:,}"]
        for metric in metrics:
            for ratio in ratios:
                e = cells.get((r["method"], ratio))
                row.append(f"{e[f'{metric}_mean']:.3f} ± {e[f'{metric}_std']:.3f}" if e else "-")
        rows.append(row)
    return header, rows


def cell_table(rows: list[dict[str, Any]], metrics: Sequence[str]) -> Table:
    """Every cell on its own row, with the MLflow run that holds it."""
    header = ["method", "seed", "label ratio", "trainable", *metrics, "MLflow run"]
    ordered = sorted(rows, key=lambda r: (r["method"], r["label_ratio"], r["seed"]))
    return header, [[r["method"], str(r["seed"]), f"{r['label_ratio']:g}", f"{r['trainable']:,}",
                     *(f"{r[m]:.3f}" for m in metrics), r["run_id"]] for r in ordered]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def plot(summary: list[dict[str, Any]], path: Path, title: str, metric: str, label: str) -> Path:
    """Fig. 1 of the paper, left: the test ``metric`` (named ``label``) at the largest label ratio
    against trainable parameters (log); right: against the label ratio, per method. Bars: std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(e["label_ratio"] for e in summary)
    methods = list(dict.fromkeys(e["method"] for e in summary))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for method in methods:
        entries = [e for e in summary if e["method"] == method]
        best = next(e for e in entries if e["label_ratio"] == top)
        left.errorbar(best["trainable"], best[f"{metric}_mean"], yerr=best[f"{metric}_std"], fmt="o", capsize=3)
        left.annotate(method, (best["trainable"], best[f"{metric}_mean"]), textcoords="offset points",
                      xytext=(5, 5), fontsize=8)
        right.errorbar([e["label_ratio"] for e in entries], [e[f"{metric}_mean"] for e in entries],
                       yerr=[e[f"{metric}_std"] for e in entries], marker="o", capsize=3, label=method)
    left.set_xscale("log")
    left.set_xlabel("trainable parameters (log)")
    left.set_ylabel(f"{SPLIT} {label} at {top:.0%} labels")
    right.set_xscale("log")
    ratios = sorted({e["label_ratio"] for e in summary})
    right.set_xticks(ratios, [f"{r:.0%}" for r in ratios])
    right.minorticks_off()
    right.set_xlabel("labelled share of the training split")
    right.set_ylabel(f"{SPLIT} {label}")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_html(title: str, notes: list[str], tables: list[tuple[str, Table]], png: Path) -> str:
    """One self-contained page (the plot inlined), which the KFP UI and MLflow both show."""
    esc = html.escape
    parts = [f'<!doctype html><meta charset="utf-8"><title>{esc(title)}</title>',
             "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}</style>", f"<h2>{esc(title)}</h2>", *(f"<p>{esc(n)}</p>" for n in notes)]
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    for index, (caption, (header, rows)) in enumerate(tables):
        parts.append(f"<h3>{esc(caption)}</h3><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
        if index == 0:
            parts.append(f'<img alt="test score vs trainable parameters and label ratio" src="data:image/png;base64,{image}">')
    return "".join(parts) + "\n"


def compare(cfg: ExperimentConfig, train_dirs: Sequence[Path], out_dir: Path, title: str = "") -> dict[str, Any]:
    """Aggregate the evaluated cells whose train step folders are ``train_dirs`` (each holds the
    ``run.json`` naming its MLflow run); returns the rows, summary, ranking and the parent run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = get_task(cfg.data.task)
    metrics, primary = task.comparison_metrics, task.selection_metric
    run_ids = [read_run_file(d)["run_id"] for d in train_dirs]
    connect(cfg)
    client = MlflowClient()
    rows = cell_rows(client, run_ids, metrics)
    summary = summarise(rows, metrics)
    ranking = rank(summary, primary)
    random_weights = any(r["random_weights"] for r in rows)
    title = (title or f"{cfg.model.backbone}: PEFT methods on {SPLIT}") + (" (RANDOM WEIGHTS)" if random_weights else "")
    seeds = sorted({r["seed"] for r in rows})
    notes = [f"{len(rows)} cells: mean ± sample std over seeds {seeds}; ranked by test {task.metric_labels[primary]} "
             "averaged over the label ratios."]
    by_method = table(summary, ranking, metrics)
    png = plot(summary, out_dir / "comparison.png", title, primary, task.metric_labels[primary])
    (out_dir / "comparison.md").write_text(markdown(*by_method))
    tables = [("Per method: mean ± std over seeds", by_method), ("Per cell", cell_table(rows, metrics))]
    (out_dir / REPORT_FILE).write_text(report_html(title, notes, tables, png))
    result = {"title": title, "task": task.name, "cells": len(rows), "random_weights": random_weights,
              "ranking": ranking, "summary": summary, "scores": scores(summary, metrics), "rows": rows}
    (out_dir / RESULT_FILE).write_text(json.dumps(result, indent=2))
    with mlflow.start_run(run_name=COMPARISON_RUN) as run:
        mlflow.set_tags({"comparison": "true", "random_weights": str(random_weights).lower()})
        mlflow.log_metrics(result["scores"])
        mlflow.log_artifacts(str(out_dir))
        for run_id in run_ids:
            client.set_tag(run_id, "mlflow.parentRunId", run.info.run_id)
    log.info("compared %d cells; ranking: %s", len(rows), ", ".join(r["method"] for r in ranking))
    return {**result, "run_id": run.info.run_id, "report": str(out_dir / REPORT_FILE)}
