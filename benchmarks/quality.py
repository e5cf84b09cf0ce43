"""Quality of every PEFT method on a controlled task, per label ratio (10/20/40/100% of the
training labels), mean and std over 3 seeds, as a table, JSON and a Fig. 1-style plot (score vs
trainable parameters; score vs label ratio). Two tasks (``--task``): classification (test
quadratic kappa and accuracy) and segmentation (test Dice, IoU and HD95).

No pretrained weights can be downloaded here, so by default the benchmark makes its own: a small
backbone is trained from scratch on a generic synthetic SOURCE task by the product's pretrain step
(the stand-in ``make run`` adapts) and saved under ``benchmarks/results/cache/``, keyed by a hash
of everything that made it and reused by later runs:

- classification: a small ViT (timm's vit_tiny layout at depth 6, patch 8, 64 px) on scenes of
  coloured dots (``dvpt_core/data/synthetic/source.py``), adapted to the built-in fundus-like
  DR-grading set;
- segmentation: a small SegFormer (MiT-B0's layout at widths 16-128, two blocks per stage, 64 px)
  on segmenting discs, squares and triangles in cluttered scenes
  (``dvpt_core/data/synthetic/source_segmentation.py``), adapted to the built-in Kvasir-style
  polyp set (``data.format=kvasir``, ``dvpt generate-data``'s generator).

Each target has its own seed: a different domain and a different task from the source. The
backbone is loaded exactly as users load it (``model.weights=stand-in`` with
``model.weights_file``), and every cell is a run of the product's own preprocess, train (MLflow)
and evaluate steps, aggregated by ``dvpt_core.steps.compare`` into the report the Kubeflow
comparison pipeline also writes. So ``--backbone``/``--weights-file``/``--data`` run the same
benchmark on a real pretrained backbone and a real dataset (DDR or Kvasir-SEG layout).

Every cell trains at least ``min_steps`` optimiser steps: a 10% subset is repeated for more
epochs rather than trained for a tenth of the updates, so the ratios compare labels, not update
counts. The data are preprocessed once for the whole grid: each cell's labelled subset is taken
when it trains, from the cache's ``splits.csv``. Cells run in parallel worker processes with one
thread each: on a small shared CPU, two single-threaded trainings outrun one two-threaded one by
far (OpenMP threads spin-wait on each other when another process holds a core). The
classification grid (8 methods x 4 ratios x 3 seeds = 96 cells) is sized to finish in under 40
minutes on a 2-core CPU, pre-training included; the segmentation grid (the 8 methods that apply
to SegFormer, 96 cells) in under 60.

    .venv/bin/python benchmarks/quality.py                        # the classification grid
    .venv/bin/python benchmarks/quality.py --task segmentation    # the segmentation grid
    .venv/bin/python benchmarks/quality.py --quick                # a smoke grid (add --task segmentation)
    .venv/bin/python benchmarks/quality.py --backbone vit_base_patch16_224.augreg2_in21k_ft_in1k \\
        --weights-file vit_b16.safetensors --image-size 224 --data /data/DDR --set train.epochs=20
    .venv/bin/python benchmarks/quality.py --task segmentation --backbone /models/segformer-b4-ade \\
        --image-size 512 --data /data/Kvasir-SEG --set train.epochs=80

Results go to ``benchmarks/results/quality-<task>-<time>/`` (gitignored): ``quality.json``
(settings, timing, ranking, every cell), ``report/`` (``report.html``, ``comparison.png``,
``comparison.md``) and the MLflow store ``mlflow.db`` with every cell's run under a parent run
``comparison``.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: threads that wait passively leave the core to whoever holds it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "cache"
from dvpt_core.config import ExperimentConfig, load_config  # noqa: E402
from dvpt_core.steps.compare import (  # noqa: E402
    ALL_METHODS, DEFAULT_RATIOS, DEFAULT_SEEDS, cell_config, compare, expand_grid, markdown,
    parse_method_overrides, table,
)
from dvpt_core.tasks import get_task  # noqa: E402

log = logging.getLogger("quality")


@dataclass(frozen=True)
class Scale:
    """What ``--quick`` shrinks: data sizes, epochs and the grid."""

    source: dict[str, int]
    pretrain_epochs: int
    target: dict[str, int]
    epochs: int
    min_steps: int
    methods: list[str]
    seeds: list[int]
    ratios: list[float]


@dataclass(frozen=True)
class Benchmark:
    """One task's benchmark: the small backbone pre-trained on its source task and adapted, the
    settings every cell shares, per-method overrides, the synthetic target and the two scales."""

    backbone: list[str]
    adapt: list[str]
    method_overrides: dict[str, list[str]]
    # The built-in target: its data.format (dvpt generate-data's generator) and synthetic.* settings
    # beside the scale's sizes; the target's own seed (the repository's default dataset uses 0).
    target_format: str
    target_settings: list[str]
    target_name: str
    default: Scale
    quick: Scale


# --- classification: a small ViT, the fundus-like DR-grading target -------------------------------

# Both tasks are about how many small objects an image holds, and random resized crops change
# that count between a training image and its label (measured: with the default crop scale
# (0.8, 1) a linear probe's validation accuracy fell as it trained); flips keep it, so only flips.
NO_CROP = "train.crop_scale=[1.0, 1.0]"
CLASSIFICATION = Benchmark(
    # The small ViT every default run pre-trains and adapts; a real backbone replaces these three.
    backbone=["model.backbone=vit_tiny_r_s16_p8_224", "model.backbone_kwargs={patch_size: 2, depth: 6}",
              "model.image_size=64"],
    # m = 10 prompts for DVPT and VPT (50 would outnumber the 64 patch tokens at 64 px), batch 16,
    # a one-epoch warm-up.
    adapt=["model.prompts=10", "model.vpt.prompts=10", "train.batch_size=16", "train.warmup_epochs=1",
           "train.lr=0.008", NO_CROP],
    # Learning rates (AdamW) per method, each the best of three candidates by mean validation kappa
    # at 10% and 100% labels, seed 0: {5e-4, 2e-3, 8e-3} for the PEFT methods (all chose 8e-3, the
    # default above), {3e-3, 1e-2, 3e-2} for the linear probe, {1e-4, 3e-4, 1e-3} for full fine-tuning.
    method_overrides={"linear": ["train.lr=0.03"], "full": ["train.lr=0.0001"]},
    target_format="ddr", target_settings=["synthetic.image_size=128", "synthetic.seed=1"],
    target_name="the synthetic DR-grading target",
    default=Scale(source={"train": 1600, "valid": 160, "test": 80}, pretrain_epochs=8,
                  target={"train": 320, "valid": 80, "test": 300}, epochs=6, min_steps=36,
                  methods=ALL_METHODS, seeds=DEFAULT_SEEDS, ratios=DEFAULT_RATIOS),
    quick=Scale(source={"train": 240, "valid": 40, "test": 16}, pretrain_epochs=2,
                target={"train": 80, "valid": 20, "test": 40}, epochs=2, min_steps=4,
                methods=["linear", "dvpt"], seeds=[0], ratios=[0.5, 1.0]),
)

# --- segmentation: a small SegFormer, the Kvasir-style polyp target ---------------------------------

# Every method that applies to SegFormer (shallow VPT does not: MiT has no single token sequence).
SEGFORMER_METHODS = ["linear", "full", "vpt_deep", "ssf", "adaptformer", "lora", "evp", "dvpt"]
SEGMENTATION = Benchmark(
    # MiT-B0's layout shrunk to widths 16-128 with two blocks per stage (so that DVPT's sharing by
    # s = 2 blocks means something), 64 px: stages of 16x16, 8x8, 4x4 and 2x2 tokens.
    backbone=["model.backbone=nvidia/segformer-b0-finetuned-ade-512-512",
              "model.backbone_kwargs={hidden_sizes: [16, 32, 64, 128], depths: [2, 2, 2, 2], "
              "num_attention_heads: [1, 1, 2, 4], decoder_hidden_size: 64}",
              "model.image_size=64"],
    # Table 2's model: the released decoder layout; DVPT as released (d' = 10, s = 2) with 4 prompts
    # per block (the last stage has 4 tokens at 64 px), VPT with 10; batch 16 and the paper's
    # learning rate for polyps (0.01), flips and random crops (the paper's augmentation).
    adapt=["model.segformer.decoder=released", "model.segformer.prompts=4", "model.vpt.prompts=10",
           "train.batch_size=16", "train.warmup_epochs=1", "train.lr=0.01"],
    # Not tuned (no time on this machine): 0.01 for every PEFT method, 3x that for the linear probe
    # (as the classification grid found), the pre-training rate for full fine-tuning.
    method_overrides={"linear": ["train.lr=0.03"], "full": ["train.lr=0.001"]},
    target_format="kvasir", target_settings=["synthetic.image_size=80", "synthetic.seed=1"],
    target_name="the synthetic Kvasir-style polyp target",
    default=Scale(source={"train": 1600, "valid": 160, "test": 160}, pretrain_epochs=12,
                  target={"seg_images": 250}, epochs=6, min_steps=40,
                  methods=SEGFORMER_METHODS, seeds=DEFAULT_SEEDS, ratios=DEFAULT_RATIOS),
    quick=Scale(source={"train": 64, "valid": 16, "test": 16}, pretrain_epochs=1,
                target={"seg_images": 40}, epochs=1, min_steps=2,
                methods=["dvpt"], seeds=[0], ratios=[0.4]),
)
BENCHMARKS = {"classification": CLASSIFICATION, "segmentation": SEGMENTATION}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    start = time.perf_counter()
    bench = BENCHMARKS[args.task]
    scale = bench.quick if args.quick else bench.default
    scale = replace(scale, methods=args.methods or scale.methods, seeds=args.seeds or scale.seeds,
                    ratios=args.ratios or scale.ratios)
    out = (args.out or RESULTS / f"quality-{args.task}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}").resolve()
    out.mkdir(parents=True)
    uri = _tracking(out)

    backbone = _backbone_settings(args, bench, scale)
    backbone_s = time.perf_counter() - start
    data = args.data or _target_data(out / "target", bench, scale)
    base = load_config(None, [*backbone, f"data.format={bench.target_format}", *bench.adapt,
                              f"tracking.tracking_uri={uri}", "tracking.experiment=quality",
                              f"train.epochs={scale.epochs}", *args.overrides])
    given = parse_method_overrides(args.method_set, scale.methods)
    method_overrides = {m: bench.method_overrides.get(m, []) + given.get(m, []) for m in scale.methods}
    grid = expand_grid(scale.methods, scale.seeds, scale.ratios, method_overrides)
    cache = _preprocess(base, grid, data, out / "caches", scale.min_steps)
    task = get_task(base.data.task)
    train_dirs = _run_cells(base, grid, cache, out / "cells", args.workers, task.selection_metric)
    origin = "given weights" if args.backbone or args.weights_file else "pre-trained on the synthetic source task"
    title = f"{base.model.backbone} ({origin}) adapted to {args.data or bench.target_name}"
    result = compare(base, train_dirs, out / "report", title=title)
    wall = time.perf_counter() - start
    header, rows = table(result["summary"], result["ranking"], task.comparison_metrics)
    summary = {
        "task": task.name, "wall_time_s": wall, "backbone_s": backbone_s, "cells": len(grid), "workers": args.workers,
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "scale": asdict(scale),
        "settings": {"backbone": backbone, "adapt": bench.adapt, "method_overrides": method_overrides,
                     "overrides": args.overrides, "data": str(data)},
        "ranking": result["ranking"], "summary": result["summary"], "rows": result["rows"],
        "report": result["report"], "mlflow": uri, "comparison_run": result["run_id"],
    }
    (out / "quality.json").write_text(json.dumps(summary, indent=2))
    primary = task.selection_metric
    print(f"\n{result['title']}\n\n{markdown(header, rows)}")
    print(f"ranking (test {task.metric_labels[primary]} averaged over label ratios): "
          + " > ".join(f"{r['method']} ({r[f'{primary}_mean_over_ratios']:.3f})" for r in result["ranking"]))
    print(f"\n{len(grid)} cells, wall time {wall / 60:.1f} min ({backbone_s / 60:.1f} min to pre-train or load "
          f"the backbone), {args.workers} workers on {os.cpu_count()} CPUs; results in {out}")
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(BENCHMARKS), default="classification",
                        help="classification: a small ViT on DR grading; segmentation: a small SegFormer on polyps")
    parser.add_argument("--quick", action="store_true", help="a smoke grid with tiny data (minutes)")
    parser.add_argument("--backbone", help="a backbone to adapt instead of the self-pre-trained small one: a timm "
                        "model name (weights from --weights-file, else timm's hub or offline cache), or for "
                        "segmentation a SegFormer hub name or save_pretrained folder")
    parser.add_argument("--weights-file", type=Path, help="pretrained timm backbone weights (safetensors or checkpoint)")
    parser.add_argument("--image-size", type=int, default=224, help="input size with --backbone (default 224)")
    parser.add_argument("--data", type=Path, help="a dataset instead of the synthetic target: DDR's layout "
                        "(classification) or Kvasir-SEG's (segmentation), or another format dvpt reads with "
                        "--set data.format=...")
    parser.add_argument("--methods", nargs="+", help="default: every method that applies to the task's backbone")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 0 1 2")
    parser.add_argument("--ratios", nargs="+", type=float, help="labelled shares of the training split "
                        "(default: 0.1 0.2 0.4 1.0)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of every cell, e.g. --set train.epochs=20 (repeatable; "
                        "the per-method learning rates still apply)")
    parser.add_argument("--method-set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="override a setting of one method's cells, e.g. dvpt:model.share_every=2 (repeatable)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="cells trained at once, one process and one thread each (default: CPU count)")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/quality-<task>-<time>)")
    return parser


def _tracking(out: Path) -> str:
    """A throwaway SQLite MLflow store in the results folder, artifacts beside it (not in ./mlruns)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("quality", artifact_location=(out / "artifacts" / "quality").as_uri())
    return uri


def _backbone_settings(args: argparse.Namespace, bench: Benchmark, scale: Scale) -> list[str]:
    """The model settings every cell starts from: a named backbone (real weights), a given file
    for the default architecture, or the default architecture pre-trained here (cached)."""
    if args.backbone:
        weights = [f"model.weights_file={args.weights_file}"] if args.weights_file else []
        return [f"model.backbone={args.backbone}", f"model.image_size={args.image_size}", "model.weights=pretrained",
                *weights]
    if args.weights_file:
        return [*bench.backbone, "model.weights=pretrained", f"model.weights_file={args.weights_file}"]
    return [*bench.backbone, "model.weights=stand-in", f"model.weights_file={pretrain(bench, scale)}"]


def pretrain(bench: Benchmark, scale: Scale) -> Path:
    """The default backbone pre-trained on its source task (classification for a ViT, segmentation
    for a SegFormer) by the product's own pretrain step, cached under ``benchmarks/results/cache``
    by its settings."""
    from dvpt_core.steps.pretrain import BACKBONE_FILE, settings_key, source_task
    from dvpt_core.steps.pretrain import pretrain as pretrain_step

    sizes = [f"pretrain.{split}={n}" for split, n in scale.source.items()]
    cfg = load_config(None, [*bench.backbone, *sizes, f"pretrain.epochs={scale.pretrain_epochs}"])
    out = CACHE / f"stand-in-{settings_key(cfg)}"
    summary = pretrain_step(cfg, out)
    score = source_task(cfg).score
    log.info("stand-in backbone: source-task test %s %.3f (%s)", score, summary[f"source_test_{score}"], out)
    return out / BACKBONE_FILE


def _target_data(root: Path, bench: Benchmark, scale: Scale) -> Path:
    """The task's built-in synthetic dataset (``dvpt generate-data``'s generator, in the real
    dataset's layout) with the benchmark's own seed and sizes."""
    from dvpt_core.data.synthetic import generate_dataset

    sizes = [f"synthetic.{key}={n}" for key, n in scale.target.items()]
    generate_dataset(root, load_config(None, [f"data.format={bench.target_format}", *bench.target_settings, *sizes]))
    return root


def _preprocess(base: ExperimentConfig, grid: list[dict], data: Path, root: Path, min_steps: int) -> Path:
    """One cache for the whole grid (each cell's labelled subset is taken when it trains); each
    cell's epochs are raised (in its overrides) until it takes ``min_steps`` optimiser steps on its
    labelled subset. The data are validated once, as the comparison pipeline does."""
    from dvpt_core.data.cache_layout import SPLITS_FILE
    from dvpt_core.data.splits import labelled_rows
    from dvpt_core.steps.preprocess import preprocess
    from dvpt_core.steps.validate import validate

    validation, cache = root / "validation", root / "cache"
    validate(base, data, validation)
    preprocess(base, data, cache, validation)
    for cell in grid:
        labelled = len(labelled_rows(cache / SPLITS_FILE, cell_config(base, cell).data))
        log.info("seed %d, ratio %g: %d labelled training images", cell["seed"], cell["label_ratio"], labelled)
        steps_per_epoch = math.ceil(labelled / base.train.batch_size)
        cell["overrides"].append(f"train.epochs={max(base.train.epochs, math.ceil(min_steps / steps_per_epoch))}")
    return cache


def _run_cells(base: ExperimentConfig, grid: list[dict], cache: Path, root: Path, workers: int,
               metric: str) -> list[Path]:
    """Every cell's train and evaluate steps, ``workers`` at a time; the train step folders in grid order."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    dirs = [root / f"{c['method']}-seed{c['seed']}-ratio{c['label_ratio']:g}" for c in grid]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(run_cell, base.to_json(), cell, str(cache), str(cell_dir), metric): cell
                   for cell, cell_dir in zip(grid, dirs)}
        for done, future in enumerate(as_completed(futures), start=1):
            cell, (score, seconds) = futures[future], future.result()
            log.info("[%d/%d] %s seed %d ratio %g: test %s %.3f (%.0f s)", done, len(grid), cell["method"],
                     cell["seed"], cell["label_ratio"], metric, score, seconds)
    return [d / "train" for d in dirs]


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)


def run_cell(base_json: str, cell: dict, cache: str, cell_dir: str, metric: str) -> tuple[float, float]:
    """One cell in a worker: the product's train then evaluate step; returns (test ``metric``, seconds)."""
    from dvpt_core.steps.evaluate import evaluate
    from dvpt_core.steps.train import train

    start = time.perf_counter()
    cfg = cell_config(ExperimentConfig.from_json(base_json), cell)
    train(cfg, Path(cache), Path(cell_dir) / "train")
    report = evaluate(cfg, Path(cache), Path(cell_dir) / "train", Path(cell_dir) / "evaluation")
    return report[metric], time.perf_counter() - start


if __name__ == "__main__":
    main()
