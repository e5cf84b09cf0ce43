"""What the evaluate step writes for segmentation: the per-case CSV, the per-class table, the overlay grid.

Every file is written atomically (a temporary file renamed into place), so DVC and MLflow never
pick up a half-written one.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from dvpt_core.data.atomic import atomic_file  # noqa: E402
from dvpt_core.metrics.segmentation import METRICS, CaseScores  # noqa: E402

CASE_COLUMNS = ("case", "class", *METRICS, "missed", "hd95_unit")
OVERLAY_ALPHA = 0.45
PANEL_INCHES = 2.6


def write_case_csv(cases: Sequence[CaseScores], class_names: Sequence[str], path: Path) -> Path:
    """One row per case and foreground class: Dice, IoU, HD95, whether the class was missed, HD95's unit."""
    foreground = list(class_names[1:])
    with atomic_file(Path(path)) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CASE_COLUMNS)
        for case in cases:
            for k, name in enumerate(foreground):
                writer.writerow([case.case, name, *(repr(getattr(case, m)[k]) for m in METRICS),
                                 int(case.missed[k]), case.hd95_unit])
    return Path(path)


def markdown_table(rows: Sequence[dict], hd95_unit: str) -> str:
    """``metrics.segmentation.class_table``'s rows as a Markdown table (Dice and IoU in %, as the paper)."""
    lines = [f"| class | Dice (%) | IoU (%) | HD95 ({hd95_unit}) | cases | missed |", "|---|---:|---:|---:|---:|---:|"]
    lines += [
        f"| {row['class']} | {100 * row['dice']:.2f} | {100 * row['iou']:.2f} | {row['hd95']:.2f} "
        f"| {row['cases']} | {row['missed']} |"
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def class_colours(num_classes: int) -> ListedColormap:
    """Transparent background, then one distinct colour per foreground class."""
    palette = plt.get_cmap("tab10" if num_classes <= 11 else "tab20")
    colours = [(0.0, 0.0, 0.0, 0.0)] + [(*palette(k % palette.N)[:3], 1.0) for k in range(num_classes - 1)]
    return ListedColormap(colours)


def plot_overlay_grid(
    images: np.ndarray,
    truths: np.ndarray,
    preds: np.ndarray,
    captions: Sequence[str],
    dice: Sequence[float],
    class_names: Sequence[str],
    path: Path,
    title: str,
) -> Path:
    """A row per sample: the image, the ground truth over it, the prediction over it (captioned
    with the sample's mean foreground Dice). ``images`` N x H x W x 3 uint8 (or N x H x W),
    ``truths`` and ``preds`` N x H x W class indices."""
    count = len(images)
    if not count == len(truths) == len(preds) == len(captions) == len(dice):
        raise ValueError(f"overlay grid: {count} images, {len(truths)} ground truths, {len(preds)} predictions, "
                         f"{len(captions)} captions, {len(dice)} Dice values")
    colours = class_colours(len(class_names))
    fig, axes = plt.subplots(count, 3, figsize=(3 * PANEL_INCHES, count * PANEL_INCHES + 0.6), squeeze=False)
    for row, (image, truth, pred) in enumerate(zip(images, truths, preds)):
        panels = ((None, "image"), (truth, "ground truth"), (pred, f"prediction, Dice {dice[row]:.3f}"))
        for ax, (mask, label) in zip(axes[row], panels):
            ax.imshow(image, cmap="gray" if np.ndim(image) == 2 else None)
            if mask is not None:
                ax.imshow(mask, cmap=colours, vmin=0, vmax=len(class_names) - 1,
                          alpha=OVERLAY_ALPHA, interpolation="nearest")
            ax.set_title(f"{captions[row]}: {label}" if mask is None else label, fontsize=8)
            ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours(k)) for k in range(1, len(class_names))]
    fig.legend(handles, class_names[1:], loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    with atomic_file(Path(path)) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)
