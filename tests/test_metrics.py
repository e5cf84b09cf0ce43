"""DR-grading metrics against scikit-learn, the independent reference (paper section 4.1.4).

Quadratic kappa is computed over all 5 grades (a fixed 5 x 5 matrix) even when a grade is absent
from the labels, which changes its value: scikit-learn with ``labels=range(5)`` is the reference.
"""

from __future__ import annotations

import math
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix as sk_confusion_matrix

from dvpt_core.metrics.classification import classification_metrics, confusion_matrix, plot_confusion_matrix

GRADES = list(range(5))


def reference(preds: list[int], targets: list[int]) -> dict[str, float]:
    return {
        "kappa": cohen_kappa_score(targets, preds, weights="quadratic", labels=GRADES),
        "accuracy": accuracy_score(targets, preds),
    }


CASES = {
    # every grade present, mostly off by one: quadratic weights forgive these much more than linear ones
    "all grades, near misses": ([0, 1, 2, 3, 4, 1, 2, 3, 4, 3, 0, 2], [0, 0, 2, 2, 4, 1, 3, 3, 3, 4, 1, 2]),
    # grades 3 and 4 absent from the labels (and 4 from the predictions): the 5 x 5 matrix still counts them
    "grades absent from the labels": ([0, 1, 2, 1, 0, 3, 2, 2], [0, 1, 2, 2, 0, 1, 1, 2]),
    # grade 2 absent from labels and predictions: grades 3 and 4 must stay 3 and 4 apart from 0
    "a middle grade absent": ([0, 4, 4, 0, 1, 3, 1, 0], [0, 4, 3, 1, 1, 4, 0, 3]),
    "far misses weigh more": ([4, 4, 0, 0, 2, 2], [0, 1, 4, 3, 2, 1]),
    "only one grade predicted": ([2, 2, 2, 2, 2], [0, 1, 2, 3, 4]),
    "perfect": ([0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 4, 4]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kappa_and_accuracy_match_scikit_learn_over_all_five_grades(case: str) -> None:
    preds, targets = CASES[case]
    ours = classification_metrics(torch.tensor(preds), torch.tensor(targets), num_classes=5)
    expected = reference(preds, targets)
    assert ours["kappa"] == pytest.approx(expected["kappa"], abs=1e-6)
    assert ours["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-7)


def test_kappa_is_quadratic_not_linear_nor_unweighted() -> None:
    preds, targets = CASES["all grades, near misses"]
    ours = classification_metrics(torch.tensor(preds), torch.tensor(targets), num_classes=5)["kappa"]
    for weights in ("linear", None):
        other = cohen_kappa_score(targets, preds, weights=weights, labels=GRADES)
        assert abs(ours - other) > 0.01, weights


def test_an_absent_grade_keeps_its_place_in_the_weights() -> None:
    """Grade 2 absent: a kappa over the grades present (scikit-learn's default) moves 3 and 4 next
    to 1 and differs from the 5 x 5 kappa the paper reports."""
    preds, targets = CASES["a middle grade absent"]
    ours = classification_metrics(torch.tensor(preds), torch.tensor(targets), num_classes=5)["kappa"]
    present_only = cohen_kappa_score(targets, preds, weights="quadratic")
    assert abs(ours - present_only) > 1e-3
    assert ours == pytest.approx(reference(preds, targets)["kappa"], abs=1e-6)


def test_undefined_kappa_is_zero_not_nan() -> None:
    """One constant grade for labels and predictions: kappa is 0/0 (scikit-learn: NaN); reported as 0."""
    same = torch.full((6,), 3)
    ours = classification_metrics(same, same, num_classes=5)
    assert ours == {"kappa": 0.0, "accuracy": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns that the kappa is undefined
        assert math.isnan(cohen_kappa_score(same.tolist(), same.tolist(), weights="quadratic", labels=GRADES))


def test_metrics_are_plain_floats() -> None:
    preds, targets = CASES["far misses weigh more"]
    ours = classification_metrics(torch.tensor(preds), torch.tensor(targets), num_classes=5)
    assert set(ours) == {"kappa", "accuracy"} and all(type(v) is float for v in ours.values())


def test_confusion_matrix_rows_are_true_grades_over_all_classes() -> None:
    preds, targets = CASES["grades absent from the labels"]
    ours = confusion_matrix(torch.tensor(preds), torch.tensor(targets), num_classes=5)
    np.testing.assert_array_equal(ours.numpy(), sk_confusion_matrix(targets, preds, labels=GRADES))


def test_confusion_matrix_plot_shades_rows_and_prints_counts(tmp_path, monkeypatch) -> None:
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to inspect it
    matrix = torch.tensor([[3, 1, 0], [1, 1, 0], [0, 0, 0]])
    names = ["no DR", "mild", "moderate"]
    path = plot_confusion_matrix(matrix, names, tmp_path / "cm.png", "title here")
    assert path == tmp_path / "cm.png"
    (fig,) = figures
    (ax,) = fig.axes
    shade = np.asarray(ax.images[0].get_array())
    # row-normalised; an empty row stays 0 instead of 0/0
    np.testing.assert_allclose(shade, [[0.75, 0.25, 0], [0.5, 0.5, 0], [0, 0, 0]])
    assert ax.images[0].get_clim() == (0, 1)
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert {k: t.get_text() for k, t in texts.items()} == {(i, j): str(int(matrix[i, j])) for i in range(3) for j in range(3)}
    # white on dark cells (shade above one half), black elsewhere, a shade of exactly 0.5 included
    assert [texts[i, j].get_color() for i, j in [(0, 0), (0, 1), (1, 0), (2, 2)]] == ["white", "black", "black", "black"]
    assert [t.get_text() for t in ax.get_xticklabels()] == names == [t.get_text() for t in ax.get_yticklabels()]
    assert all(t.get_rotation() == 45 and t.get_horizontalalignment() == "right" for t in ax.get_xticklabels())
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("predicted", "true", "title here")
    # 0.9 inch per class + 2 (at least 4) at 120 dpi
    with Image.open(path) as image:
        assert image.size == (564, 564)
    plot_confusion_matrix(torch.eye(2, dtype=torch.long), ["a", "b"], tmp_path / "two.png", "")
    with Image.open(tmp_path / "two.png") as image:
        assert image.size == (480, 480)
    plot_confusion_matrix(torch.eye(5, dtype=torch.long), [str(i) for i in range(5)], tmp_path / "five.png", "")
    with Image.open(tmp_path / "five.png") as image:
        assert image.size == (780, 780)
