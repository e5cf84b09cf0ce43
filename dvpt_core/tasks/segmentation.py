"""Semantic segmentation (Kvasir-SEG, ISIC 2016, ACDC, Synapse): 0.5 CE + 0.5 Dice, the best epoch by
validation Dice, Dice / IoU / HD95 per case and class on the test split (3D volumes restacked and
scored at their original size, predicted volumes written as NIfTI), a label map per image when served.

Validation Dice (the selection score) is computed after every epoch from pixel counts at the
cache's resolution: per case (a 2D image, or a 3D volume whose slices' counts are summed) and
foreground class under the same empty-mask convention as the test metrics
(``dvpt_core.metrics.segmentation``), averaged over classes and cases. It skips what makes the test
evaluation slow, resampling volumes to their original size and HD95, so it can be a little off the
test Dice of the same predictions; it only ranks epochs.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dvpt_core.data.atomic import atomic_file
from dvpt_core.data.cache_layout import IMAGES_FILE, MASKS_FILE, SLICES_FILE, VOLUMES_FILE
from dvpt_core.data.cases import has_volumes, sample_cases
from dvpt_core.data.formats.pixels import encode_png, resize_label_map
from dvpt_core.losses import segmentation_loss
from dvpt_core.metrics.per_sample import records_file, segmentation_records, write_records
from dvpt_core.metrics.segmentation import (
    METRICS, CaseScores, class_counts, class_table, overlap_scores, summary_metrics,
)
from dvpt_core.metrics.segmentation_report import markdown_table, plot_overlay_grid, write_case_csv
from dvpt_core.metrics.split import score_split
from dvpt_core.tasks.base import FIGURES_DIR, Evaluation, LossFn, Prediction, Task

CASES_FILE = "cases.csv"
CLASS_TABLE_FILE = "class_table.md"
# Predicted 3D volumes, ``<volume>.nii.gz`` with the input's affine.
VOLUMES_DIR = "volumes"
# Cases in the overlay grid: evenly spaced over the cases ranked by Dice, worst first.
OVERLAY_CASES = 6
# Batch inference's label maps, ``<input's relative path>.png``.
MASKS_DIR = "masks"


class SegmentationTask(Task):
    name = "segmentation"
    selection_metric = "dice"
    comparison_metrics = ("dice", "iou", "hd95")
    metric_labels = {"dice": "Dice", "iou": "IoU", "hd95": "HD95"}

    def loss(self) -> LossFn:
        return segmentation_loss()

    def validate(self, run: Prediction) -> dict[str, float]:
        """``val_loss`` (each batch's Dice + CE, weighted by its size: the Dice term is over a
        batch), ``val_iou`` and ``val_dice`` per case (module docstring)."""
        loss_fn, num_classes = self.loss(), len(run.class_names)
        total, seen, counts = 0.0, 0, []
        for logits, masks in run.batches("validate"):
            total += float(loss_fn(logits, masks)) * len(masks)
            seen += len(masks)
            counts.append(class_counts(logits.argmax(1).cpu().numpy(), masks.cpu().numpy(), num_classes))
        cases = sample_cases(run.split_dir)
        per_case = np.zeros((int(cases.max()) + 1, num_classes - 1, 3), dtype=np.int64)
        np.add.at(per_case, cases, np.concatenate(counts))
        dice, iou = overlap_scores(*np.moveaxis(per_case, -1, 0))
        return {"val_loss": total / max(seen, 1), "val_iou": float(iou.mean()), "val_dice": float(dice.mean())}

    def evaluate(self, run: Prediction, out_dir: Path, title: str) -> Evaluation:
        """Writes ``cases.csv`` (per case and class), ``class_table.md`` (per class, and their
        mean), ``figures/overlays.png`` and, for 3D data, ``volumes/<volume>.nii.gz``. The model's
        argmax is taken batch by batch: only the N x S x S label maps are held, never the logits."""
        truths = np.load(run.split_dir / MASKS_FILE, mmap_mode="r")
        label_maps = np.empty(truths.shape, dtype=np.uint8)
        start = 0
        for logits, _ in run.batches(f"evaluate {run.split}"):
            label_maps[start:start + len(logits)] = logits.argmax(1).to(torch.uint8).cpu().numpy()
            start += len(logits)
        three_d = has_volumes(run.split_dir)
        cases = score_split(run.cache_dir, run.split, label_maps, len(run.class_names),
                            nifti_dir=out_dir / VOLUMES_DIR if three_d else None)
        *per_class, mean = class_table(cases, run.class_names)
        unit = cases[0].hd95_unit
        table = out_dir / CLASS_TABLE_FILE
        with atomic_file(table) as tmp:
            tmp.write_text(markdown_table([*per_class, mean], unit))
        figure = self._overlays(run, cases, label_maps, truths, out_dir / FIGURES_DIR / "overlays.png", title)
        report = {
            **{m: mean[m] for m in METRICS}, "hd95_unit": unit, "cases": len(cases),
            "per_class": {row["class"]: {key: row[key] for key in (*METRICS, "missed")} for row in per_class},
        }
        extra = {"predicted_volumes": str(out_dir / VOLUMES_DIR)} if three_d else {}
        records = write_records(out_dir / records_file(run.split), segmentation_records(
            [c.case for c in cases], [c.mean_dice for c in cases], run.split, run.class_names))
        return Evaluation(
            records=records, metrics=summary_metrics(cases, run.class_names), report=report, figure=figure,
            figure_title="Image, ground truth and prediction",
            artifacts=[figure, write_case_csv(cases, run.class_names, out_dir / CASES_FILE), table],
            summary=(f"Dice={mean['dice']:.4f} IoU={mean['iou']:.4f} HD95={mean['hd95']:.2f} {unit} "
                     f"on {len(cases)} {'volumes' if three_d else 'images'}"),
            extra=extra,
        )

    def _overlays(self, run: Prediction, cases: list[CaseScores], label_maps: np.ndarray, truths: np.ndarray,
                  path: Path, title: str) -> Path:
        """Up to :data:`OVERLAY_CASES` cases from worst to best Dice; a 3D case shows the slice of
        its volume with the most ground-truth foreground. Panels are at the cache's resolution."""
        ranked = sorted(range(len(cases)), key=lambda i: cases[i].mean_dice)
        picks = np.unique(np.linspace(0, len(ranked) - 1, min(len(ranked), OVERLAY_CASES)).round().astype(int))
        shown = [self._shown_slice(run.split_dir, cases[ranked[p]], ranked[p], truths) for p in picks]
        indices = np.asarray([index for index, _ in shown])
        preds, masks = label_maps[indices], np.asarray(truths[indices])
        dice, _ = overlap_scores(*np.moveaxis(class_counts(preds, masks, len(run.class_names)), -1, 0))
        images = np.load(run.split_dir / IMAGES_FILE, mmap_mode="r")[indices]
        return plot_overlay_grid(images, masks, preds, [caption for _, caption in shown], dice.mean(axis=1),
                                 run.class_names, path, title)

    @staticmethod
    def _shown_slice(split_dir: Path, case: CaseScores, position: int, truths: np.ndarray) -> tuple[int, str]:
        """The cached sample that shows ``case`` and its caption. 2D cases are scored in the
        cache's order, so case ``position`` is sample ``position``."""
        if not has_volumes(split_dir):
            return position, case.case
        candidates = np.flatnonzero(np.load(split_dir / VOLUMES_FILE) == case.case)
        best = int(candidates[np.argmax([np.count_nonzero(truths[i]) for i in candidates])])
        return best, f"{case.case} slice {int(np.load(split_dir / SLICES_FILE)[best])}"

    def logits_shape(self, batch: int | str, image_size: int, num_classes: int) -> list[int | str]:
        return [batch, num_classes, image_size, image_size]

    def answers(self, logits: np.ndarray, class_names: Sequence[str],
                sizes: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
        """Per image: its label map at the input's own size (nearest, as evaluation resamples), a
        base64 PNG of uint8 class indices in ``class_names`` order, and each class's pixel fraction."""
        label_maps = np.asarray(logits).argmax(1).astype(np.uint8)
        answers = []
        for label_map, (height, width) in zip(label_maps, sizes):
            mask = resize_label_map(label_map, (height, width))
            counts = np.bincount(mask.ravel(), minlength=len(class_names))
            answers.append({
                "mask": base64.b64encode(encode_png(mask)).decode("ascii"), "height": height, "width": width,
                "classes": [n for n, c in zip(class_names, counts) if c],
                "fractions": {n: float(c) / mask.size for n, c in zip(class_names, counts)},
            })
        return answers

    def table_columns(self, class_names: Sequence[str]) -> list[str]:
        return ["mask", "classes", *[f"fraction_{name}" for name in class_names]]

    def table_row(self, answer: dict[str, Any], out_dir: Path, name: str) -> dict[str, Any]:
        relative = Path(MASKS_DIR) / Path(name).with_suffix(".png")
        with atomic_file(out_dir / relative) as tmp:
            tmp.write_bytes(base64.b64decode(answer["mask"]))
        return {"mask": str(relative), "classes": " ".join(answer["classes"]),
                **{f"fraction_{n}": f for n, f in answer["fractions"].items()}}

    def parity(self, outputs: Sequence[tuple[np.ndarray, np.ndarray]], atol: float) -> tuple[dict, str | None]:
        """Logits within ``atol`` and equal masks wherever PyTorch's two best classes are more
        than twice the measured logit difference apart: a pixel closer to a tie than the two graphs
        differ may go either way (``export.json`` counts how many did)."""
        report, problem = super().parity(outputs, atol)
        tolerance = 2 * report["max_abs_diff"]
        pixels = differing = unexplained = 0
        for expected, got in outputs:
            flipped = expected.argmax(1) != got.argmax(1)
            best_two = np.sort(expected, axis=1)[:, -2:]
            margin = best_two[:, 1] - best_two[:, 0]
            pixels += flipped.size
            differing += int(flipped.sum())
            unexplained += int((flipped & (margin > tolerance)).sum())
        report.update(mask_pixels=pixels, mask_pixels_differing=differing)
        if unexplained and problem is None:
            problem = (f"ONNX masks differ from PyTorch's at {unexplained} pixel(s) whose two best classes are more "
                       f"than {tolerance:.3g} apart")
        return report, problem
