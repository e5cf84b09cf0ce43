"""PyTorch access to a preprocessed split (``dvpt_core.steps.preprocess``'s array cache).

Images are memory-mapped, never loaded whole: a worker touches only the pages of the images it
returns, and several workers share the page cache. Augmentation uses torchvision's
``transforms.v2`` so the operations are the library's tested ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from dvpt_core.config import ExperimentConfig, TrainConfig
from dvpt_core.data.cache_layout import IMAGES_FILE, LABELS_FILE


class CachedSplit(Dataset):
    """``(float tensor 3 x S x S normalised with mean/std, int label)`` per preprocessed image.

    ``augment`` (the training settings) turns on random resized crops back to the same size and
    horizontal/vertical flips as configured; ``None`` returns images unchanged apart from
    normalisation. Random draws come from torch's generator (seeded per DataLoader worker).
    """

    def __init__(
        self,
        split_dir: Path,
        mean: Sequence[float],
        std: Sequence[float],
        augment: TrainConfig | None = None,
    ) -> None:
        self.split_dir = Path(split_dir)
        self.labels = _load_labels(self.split_dir)
        self._images: np.ndarray | None = None
        shape = self.images.shape
        if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
            raise ValueError(f"{self.split_dir / IMAGES_FILE}: expected N x S x S x 3 images, got shape {shape}")
        if shape[0] != len(self.labels):
            raise ValueError(
                f"{self.split_dir}: {shape[0]} images in {IMAGES_FILE} but {len(self.labels)} labels in {LABELS_FILE}"
            )
        self.transform = build_transform(shape[1], mean, std, augment)

    @property
    def images(self) -> np.ndarray:
        """The memory-mapped images, opened lazily so each DataLoader worker maps its own."""
        if self._images is None:
            self._images = np.load(self.split_dir / IMAGES_FILE, mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict:
        # Pickling a memmap copies the whole array into the worker; send the path instead.
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # np.array copies out of the read-only map (torch wants writable memory).
        image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1)
        return self.transform(image), int(self.labels[index])


def _load_labels(split_dir: Path) -> np.ndarray:
    for name in (IMAGES_FILE, LABELS_FILE):
        if not (split_dir / name).is_file():
            raise FileNotFoundError(f"{split_dir / name} does not exist; run the preprocess step first")
    return np.load(split_dir / LABELS_FILE)


def build_transform(
    size: int, mean: Sequence[float], std: Sequence[float], augment: TrainConfig | None
) -> v2.Compose:
    """uint8 3 x S x S -> normalised float32, with the configured augmentation first."""
    steps: list[v2.Transform] = []
    if augment is not None:
        if tuple(augment.crop_scale) != (1.0, 1.0):
            steps.append(v2.RandomResizedCrop(size, scale=tuple(augment.crop_scale), antialias=True))
        if augment.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if augment.vflip:
            steps.append(v2.RandomVerticalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def make_loader(
    split_dir: Path,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    cfg: ExperimentConfig,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A DataLoader over one preprocessed split: shuffled and augmented when ``train``.

    The order (and the workers' random seeds) come from ``generator``, or from one seeded with
    ``cfg.train.seed``, so a run is repeatable. With ``num_workers=0`` augmentation draws from
    torch's global generator: seed it too (``dvpt_core.runtime.seed_everything``).
    """
    dataset = CachedSplit(split_dir, mean, std, augment=cfg.train if train else None)
    workers = cfg.train.num_workers
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=train,
        num_workers=workers,
        generator=generator if generator is not None else torch.Generator().manual_seed(cfg.train.seed),
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
