"""The segmentation loss: 0.5 cross-entropy + 0.5 Dice, through MONAI's ``DiceCELoss``.

The paper (section 3.2) says "hybrid dice and cross-entropy loss"; the weights and the Dice's
exact form come from the authors' released code (``DVPT_seg_train.py`` with ``utils.DiceLoss``, TransUNet's
loss): a softmax over the C class logits; the Dice term over every class, background included,
each class's soft Dice ``(2 sum(p t) + 1e-5) / (sum(p^2) + sum(t^2) + 1e-5)`` summed over the
whole batch and the pixels (not per image), then averaged over the classes; cross-entropy averaged
over the pixels. MONAI's settings that say exactly that: ``include_background=True``,
``softmax=True``, ``squared_pred=True``, ``batch=True``, ``smooth_nr = smooth_dr = 1e-5``.
One difference, deliberate: the released training loop passes probabilities to a Dice loss that
applies the softmax again (a softmax of softmaxes); here the softmax is applied once.
"""

from __future__ import annotations

import torch
from torch import nn

CE_WEIGHT = 0.5
DICE_WEIGHT = 0.5
SMOOTH = 1e-5


class DiceCrossEntropyLoss(nn.Module):
    """``loss(logits N x C x H x W, target N x H x W class indices)`` -> a scalar."""

    def __init__(self) -> None:
        super().__init__()
        # Imported here: importing MONAI takes several seconds, which every importer of this module would pay.
        from monai.losses import DiceCELoss

        self.loss = DiceCELoss(
            include_background=True, to_onehot_y=True, softmax=True, squared_pred=True, batch=True,
            smooth_nr=SMOOTH, smooth_dr=SMOOTH, lambda_ce=CE_WEIGHT, lambda_dice=DICE_WEIGHT,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 4 or logits.shape[1] < 2:
            raise ValueError(
                f"expected N x C x H x W logits with C >= 2 (background included), got {tuple(logits.shape)}"
            )
        if target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)} "
                             "(expected N x H x W class indices)")
        # MONAI wants the class-index target with a channel axis (N x 1 x H x W).
        return self.loss(logits, target.unsqueeze(1).long())


def segmentation_loss() -> DiceCrossEntropyLoss:
    """The loss the training loop uses for ``data.task: segmentation``."""
    return DiceCrossEntropyLoss()
