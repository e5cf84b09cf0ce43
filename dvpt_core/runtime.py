"""Device choice, seeding and autocast, shared by every step that runs a model."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but no CUDA device is available; use auto or cpu")
    return device


# Streams of :func:`derived_seed`, so that no two uses of one seed draw the same numbers.
AUGMENTATION_STREAM = 1
DROPOUT_STREAM = 2


def derived_seed(*keys: int) -> int:
    """A 64-bit seed for the stream named by ``keys`` (e.g. seed, stream, epoch, sample), mixed by
    NumPy's SeedSequence: neighbouring keys give unrelated streams, unlike ``seed + epoch``."""
    return int(np.random.SeedSequence([key % 2**64 for key in keys]).generate_state(1, np.uint64)[0])


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA (no loss scaling needed); full precision on the CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
