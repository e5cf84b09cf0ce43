"""PyTorch access to a preprocessed split (``dvpt_core.steps.preprocess``'s array cache).

Images (and segmentation masks) are memory-mapped, never loaded whole: a worker touches only the
pages of the samples it returns, and several workers share the page cache. Augmentation is
``dvpt_core.data.transforms`` (torchvision's ``transforms.v2``, joint for image and mask).

A training sample's augmentation is seeded by (``train.seed``, epoch, sample index) alone, never by
which process or DataLoader worker loads it: one process, N ``torchrun`` processes, any number of
workers and a resumed run all see the same augmented epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dvpt_core.config import ExperimentConfig, TrainConfig
from dvpt_core.data.cache_layout import IMAGES_FILE, LABELS_FILE, MASKS_FILE, SPLITS_FILE
from dvpt_core.data.splits import labelled_rows
from dvpt_core.data.transforms import apply, build_transform
from dvpt_core.distributed import local_batch_size
from dvpt_core.runtime import AUGMENTATION_STREAM, derived_seed

# A sample's key: its index, or (epoch, index) from :class:`EpochSampler` when it is augmented.
SampleKey = int | tuple[int, int]


class CachedSplit(Dataset):
    """Per preprocessed image: ``(float tensor 3 x S x S normalised with mean/std, target)``.

    The target is the int label of a classification cache, or the int64 S x S label map of a
    segmentation cache (one whose split holds ``masks.npy``). ``augment`` (the training settings)
    turns on random resized crops back to the same size and horizontal/vertical flips as
    configured, applied identically to image and mask; ``None`` returns images unchanged apart
    from normalisation. The random draws of sample ``index`` in ``epoch`` (the key
    ``(epoch, index)``; a bare index is epoch 0) come from torch's generator seeded by
    ``(augment.seed, epoch, index)`` for that sample alone, the global generator left as it was.
    """

    def __init__(
        self,
        split_dir: Path,
        mean: Sequence[float],
        std: Sequence[float],
        augment: TrainConfig | None = None,
    ) -> None:
        self.split_dir = Path(split_dir)
        self.segmentation = (self.split_dir / MASKS_FILE).is_file()
        self.labels = None if self.segmentation else _load(self.split_dir, LABELS_FILE)
        self._arrays: dict[str, np.ndarray] = {}
        shape = self.images.shape
        if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
            raise ValueError(f"{self.split_dir / IMAGES_FILE}: expected N x S x S x 3 images, got shape {shape}")
        if self.segmentation and self.masks.shape != shape[:3]:
            raise ValueError(f"{self.split_dir / MASKS_FILE}: expected {shape[:3]} label maps, got shape {self.masks.shape}")
        if not self.segmentation and len(self.labels) != shape[0]:
            raise ValueError(
                f"{self.split_dir}: {shape[0]} images in {IMAGES_FILE} but {len(self.labels)} labels in {LABELS_FILE}"
            )
        self.transform = build_transform(shape[1], mean, std, augment)
        self.seed = None if augment is None else augment.seed

    def _mapped(self, name: str) -> np.ndarray:
        """A memory-mapped array, opened lazily so each DataLoader worker maps its own."""
        if name not in self._arrays:
            self._arrays[name] = _load(self.split_dir, name, mmap_mode="r")
        return self._arrays[name]

    @property
    def images(self) -> np.ndarray:
        return self._mapped(IMAGES_FILE)

    @property
    def masks(self) -> np.ndarray:
        return self._mapped(MASKS_FILE)

    def __getstate__(self) -> dict:
        # Pickling a memmap copies the whole array into the worker; send the path instead.
        return {**self.__dict__, "_arrays": {}}

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int | torch.Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if self.seed is None:
            return self._sample(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(self.seed, AUGMENTATION_STREAM, epoch, index))
            return self._sample(index)

    def _sample(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        # np.array copies out of the read-only map (torch wants writable memory).
        image = torch.from_numpy(np.array(self.images[index])).permute(2, 0, 1)
        if not self.segmentation:
            return apply(self.transform, image)[0], int(self.labels[index])
        return apply(self.transform, image, torch.from_numpy(np.array(self.masks[index])))


def _load(split_dir: Path, name: str, mmap_mode: str | None = None) -> np.ndarray:
    if not (split_dir / name).is_file():
        raise FileNotFoundError(f"{split_dir / name} does not exist; run the preprocess step first")
    return np.load(split_dir / name, mmap_mode=mmap_mode)


class RowSubset(Dataset):
    """Some rows of a cached split (the labelled share of ``data.label_ratio``), keyed as
    :class:`CachedSplit` is: a position, or (epoch, position). A sample keeps its cache row's
    augmentation seed, whichever subset it is in (torch's Subset cannot pass epoch keys on)."""

    def __init__(self, dataset: CachedSplit, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, int | torch.Tensor]:
        if isinstance(key, tuple):
            epoch, position = key
            return self.dataset[(epoch, self.indices[position])]
        return self.dataset[self.indices[key]]


class EpochSampler(DistributedSampler):
    """The training order: each epoch a permutation drawn from ``train.seed + epoch``, process
    ``rank`` of ``num_replicas`` taking every ``num_replicas``-th sample of it (torch's
    DistributedSampler; one process takes all), each index paired with its epoch so the sample's
    augmentation is seeded alike wherever it is loaded (:class:`CachedSplit`). Call
    :func:`set_epoch` before each epoch."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in super().__iter__())


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Order and augment a training loader's next pass as epoch ``epoch`` (0-based)."""
    loader.sampler.set_epoch(epoch)


def make_loader(
    split_dir: Path,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    cfg: ExperimentConfig,
    generator: torch.Generator | None = None,
    image_size: int | None = None,
    world_size: int = 1,
    rank: int = 0,
) -> DataLoader:
    """A DataLoader over one preprocessed split: in the cache's order, or when ``train`` shuffled
    and augmented as epoch 0 until :func:`set_epoch` says otherwise.

    ``image_size``: the input size the model takes; a cache preprocessed at another size is
    refused here, naming both, rather than deep inside the model's forward pass. Over the training
    split (a folder named ``train``) only ``data.label_ratio``'s labelled subset is read
    (``dvpt_core.data.splits.labelled_rows``: the cache holds the whole split).

    Training order and augmentation follow ``cfg.train.seed`` and the epoch only
    (:class:`EpochSampler`), so a run is repeatable. Under ``torchrun`` (``world_size`` > 1) a
    training loader yields process ``rank``'s share of each global batch of
    ``cfg.train.batch_size``; the shares together are one process's batch
    (``dvpt_core.distributed.GlobalBatch``). ``generator`` seeds the workers' own generators.
    """
    dataset = CachedSplit(split_dir, mean, std, augment=cfg.train if train else None)
    cached = dataset.images.shape[1]
    if image_size is not None and cached != image_size:
        raise ValueError(f"{Path(split_dir) / IMAGES_FILE} holds {cached}x{cached} images but the model takes "
                         f"{image_size}x{image_size}: preprocess again with model.image_size={image_size}")
    samples: Dataset = dataset
    if Path(split_dir).name == "train" and cfg.data.label_ratio < 1:
        samples = RowSubset(dataset, labelled_rows(Path(split_dir).parent / SPLITS_FILE, cfg.data))
    workers = cfg.train.num_workers
    sampler = EpochSampler(samples, num_replicas=world_size, rank=rank, seed=cfg.train.seed) if train else None
    return DataLoader(
        samples,
        batch_size=local_batch_size(cfg.train.batch_size, world_size) if train else cfg.train.batch_size,
        sampler=sampler,
        num_workers=workers,
        generator=generator if generator is not None else torch.Generator().manual_seed(cfg.train.seed),
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
