"""Training-time transforms of cached images and masks, from torchvision's ``transforms.v2``.

``transforms.v2`` applies one random draw to every input of a call and dispatches on the input's
type: a ``tv_tensors.Mask`` is cropped and flipped exactly like its ``tv_tensors.Image`` but
resized nearest-neighbour and never rescaled or normalised. So one pipeline serves classification
(image only) and segmentation (image and mask) with the library's tested geometry instead of
hand-written index arithmetic. The cache already holds images at the model's input size, so
random resized crops resize back to that size. Normalisation uses the mean and std of the
backbone's pretrained configuration (timm's ``pretrained_cfg``, reported by
``dvpt_core.models.backbone`` as ``BackboneInfo.mean`` / ``.std``), the statistics its weights saw.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from dvpt_core.config import TrainConfig


def build_transform(
    size: int, mean: Sequence[float], std: Sequence[float], augment: TrainConfig | None
) -> v2.Compose:
    """uint8 ``Image`` (3 x S x S) [+ ``Mask``] -> normalised float32 image [+ the same-geometry mask],
    with the configured augmentation (random resized crop, horizontal / vertical flips) first."""
    steps: list[v2.Transform] = []
    if augment is not None:
        if tuple(augment.crop_scale) != (1.0, 1.0):
            steps.append(v2.RandomResizedCrop(size, scale=tuple(augment.crop_scale), antialias=True))
        if augment.rotation or augment.translate:
            translate = (augment.translate, augment.translate) if augment.translate else None
            # Bilinear for the image; transforms.v2 always moves a mask nearest-neighbour.
            steps.append(v2.RandomAffine(degrees=augment.rotation, translate=translate,
                                         interpolation=v2.InterpolationMode.BILINEAR))
        if any(augment.color_jitter):
            steps.append(v2.ColorJitter(*augment.color_jitter))
        if augment.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if augment.vflip:
            steps.append(v2.RandomVerticalFlip())
    steps += [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]
    return v2.Compose(steps)


def apply(
    transform: v2.Compose, image: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``transform`` on a uint8 3 x S x S image and optional S x S mask; plain tensors out
    (float32 image, int64 mask), so batches collate and models see ordinary tensors."""
    if mask is None:
        return transform(tv_tensors.Image(image)).as_subclass(torch.Tensor), None
    out_image, out_mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor).long()
