"""Bootstrap confidence intervals of a model's metric and of the difference between two models.

The resampling is scipy's (``scipy.stats.bootstrap``, percentile intervals, vectorised over
resamples); this module supplies the statistics, one per task's primary metric:

- classification, quadratic kappa: a resample draws test images with replacement and the kappa
  is recomputed on that resample's confusion matrix (kappa is not a mean of per-image scores,
  so the whole statistic is recomputed, as in ``dvpt_core.metrics.classification``: a fixed
  K x K matrix, 0/0 reported as 0). Each sample is one integer ``label * K + pred``
  (``SampleRecords.scores``), so resampling keeps a label with its prediction.
- segmentation, Dice: the mean of the per-case Dice over the resampled cases.

Paired (the same test samples, in the same order, for both models): one set of resampled
indices serves both, so the interval reflects the difference on common samples, much tighter
than two independent intervals. Unpaired (other test data): each model is resampled on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from dvpt_core.config import PromotionConfig

Statistic = Callable[..., np.ndarray]
# Resamples evaluated at once: bounds memory on large test sets (3,759 DDR images).
BATCH = 500


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap percentile interval at ``confidence``."""

    value: float
    low: float
    high: float
    confidence: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "confidence": self.confidence}


@dataclass(frozen=True)
class Comparison:
    """Challenger minus champion on the primary metric, with both models' own estimates."""

    metric: str
    challenger: Estimate
    champion: Estimate
    difference: Estimate
    paired: bool
    samples: tuple[int, int]
    resamples: int
    seed: int
    distribution: np.ndarray = field(repr=False, compare=False)

    def as_dict(self) -> dict:
        return {"metric": self.metric, "challenger": self.challenger.as_dict(), "champion": self.champion.as_dict(),
                "difference": self.difference.as_dict(), "paired": self.paired, "samples": list(self.samples),
                "resamples": self.resamples, "seed": self.seed}


def quadratic_kappa(codes: np.ndarray, num_classes: int, axis: int = -1) -> np.ndarray:
    """Quadratic-weighted Cohen's kappa of ``label * K + pred`` codes along ``axis``, for every
    other index at once (one confusion matrix per resample, by one ``bincount``)."""
    codes = np.moveaxis(np.asarray(codes, dtype=np.int64), axis, -1)
    batch, n = codes.shape[:-1], codes.shape[-1]
    flat = codes.reshape(-1, n)
    k2 = num_classes * num_classes
    offsets = np.arange(len(flat), dtype=np.int64)[:, None] * k2
    observed = np.bincount((flat + offsets).ravel(), minlength=len(flat) * k2).reshape(-1, num_classes, num_classes)
    observed = observed.astype(np.float64)
    grades = np.arange(num_classes, dtype=np.float64)
    weights = (grades[:, None] - grades[None, :]) ** 2
    expected = observed.sum(axis=2)[:, :, None] * observed.sum(axis=1)[:, None, :] / n
    disagreement = (weights * observed).sum(axis=(1, 2))
    chance = (weights * expected).sum(axis=(1, 2))
    # chance = 0 only when every label and prediction is one and the same class: reported as 0.
    kappa = np.divide(disagreement, chance, out=np.ones_like(chance), where=chance > 0)
    return (1.0 - kappa).reshape(batch)


def metric_statistic(metric: str, num_classes: int) -> Statistic:
    """``statistic(scores, axis)`` of a task's primary metric over ``SampleRecords.scores()``."""
    if metric == "kappa":
        return lambda scores, axis=-1: quadratic_kappa(scores, num_classes, axis)
    if metric in ("dice", "accuracy"):
        return lambda scores, axis=-1: np.mean(scores, axis=axis)
    raise ValueError(f"no bootstrap statistic for metric {metric!r}")


def estimate(scores: np.ndarray, statistic: Statistic, settings: PromotionConfig) -> Estimate:
    """One model's metric on ``scores`` with its bootstrap interval."""
    scores = np.asarray(scores)
    result = stats.bootstrap((scores,), statistic, n_resamples=settings.resamples, vectorized=True, batch=BATCH,
                             confidence_level=settings.confidence, method="percentile", rng=settings.seed)
    return _estimate(float(statistic(scores)), result.confidence_interval, settings.confidence)


def compare(metric: str, challenger: np.ndarray, champion: np.ndarray, statistic: Statistic,
            settings: PromotionConfig, paired: bool = True) -> Comparison:
    """Challenger minus champion with a bootstrap interval; ``paired`` needs both score vectors
    over the same samples in the same order."""
    challenger, champion = np.asarray(challenger), np.asarray(champion)
    if paired and challenger.shape != champion.shape:
        raise ValueError(f"paired scores must cover the same samples: {challenger.shape} vs {champion.shape}")

    def difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(a, axis=axis) - statistic(b, axis=axis)

    result = stats.bootstrap((challenger, champion), difference, n_resamples=settings.resamples, vectorized=True,
                             batch=BATCH, paired=paired, confidence_level=settings.confidence, method="percentile",
                             rng=settings.seed)
    return Comparison(
        metric=metric,
        challenger=estimate(challenger, statistic, settings),
        champion=estimate(champion, statistic, settings),
        difference=_estimate(float(difference(challenger, champion)), result.confidence_interval, settings.confidence),
        paired=paired,
        samples=(len(challenger), len(champion)),
        resamples=settings.resamples,
        seed=settings.seed,
        distribution=np.asarray(result.bootstrap_distribution),
    )


def compare_kappa(challenger_codes: np.ndarray, champion_codes: np.ndarray, num_classes: int,
                  settings: PromotionConfig, paired: bool = True) -> Comparison:
    """Classification: quadratic kappa, each test image one ``label * K + pred`` code."""
    return compare("kappa", challenger_codes, champion_codes, metric_statistic("kappa", num_classes), settings,
                   paired)


def compare_dice(challenger_dice: np.ndarray, champion_dice: np.ndarray, settings: PromotionConfig,
                 paired: bool = True) -> Comparison:
    """Segmentation: mean Dice, one score per case (image or volume), averaged over its
    foreground classes (``dvpt_core.metrics.segmentation.CaseScores.mean_dice``)."""
    return compare("dice", challenger_dice, champion_dice, metric_statistic("dice", 0), settings, paired)


def _estimate(value: float, interval: object, confidence: float) -> Estimate:
    return Estimate(value=value, low=float(interval.low), high=float(interval.high), confidence=confidence)
