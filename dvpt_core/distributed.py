"""Data-parallel training under ``torchrun``: the processes, their collectives and the global batch.

``torchrun --nproc-per-node N -m dvpt_core.cli train ...`` (or a Kubeflow PyTorchJob, which runs
the same) starts N processes and tells each its place through ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; :func:`process_group` reads them and joins torch.distributed's own ``env://``
rendezvous (NCCL on CUDA, gloo on the CPU). Without them (``dvpt train``) it is one process and
nothing here changes the training.

The contract: N processes train exactly what one process does with the same configuration,
up to floating-point rounding. ``train.batch_size`` is the global batch; each process loads
its ``1/N`` share of every global batch (``dvpt_core.data.dataset.make_loader``), the model is
wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, and :class:`GlobalBatch` hands the
loss the whole global batch's logits in one process's order, so a loss that is not a mean of
per-sample terms (the segmentation Dice, summed over the batch) and the epoch's shorter last batch
give one process's gradients too.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
# Functional collectives: torch's replacement for the deprecated torch.distributed.nn.functional,
# whose gather has a backward (the gradient of each share goes back to its process).
import torch.distributed._functional_collectives as functional
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dvpt_core.config import ConfigError, TrainConfig
from dvpt_core.runtime import resolve_device

log = logging.getLogger(__name__)
T = TypeVar("T")
# The norms whose batch statistics a process computes over its own share of the batch only.
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that talks to MLflow and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Every process waits here for the others (at most the process group's timeout)."""
        if self.distributed:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def from_main(self, value: T) -> T:
        """Rank 0's ``value`` on every process (the others pass anything, e.g. None)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]


def local_batch_size(batch_size: int, world_size: int) -> int:
    """Each process's share of the global ``train.batch_size``; refused unless it divides evenly
    (uneven shares would weigh the processes' gradients unequally)."""
    if batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={batch_size} is the global batch and must divide evenly among the "
            f"{world_size} training processes (WORLD_SIZE={world_size}): set train.batch_size to a multiple "
            f"of {world_size}, or start {world_size} / k processes"
        )
    return batch_size // world_size


@contextlib.contextmanager
def process_group(train: TrainConfig) -> Iterator[Ranks]:
    """This process's :class:`Ranks` with the process group joined (and left on the way out),
    when ``torchrun`` started more than one process; a lone process otherwise.

    Every collective waits at most ``train.process_group_timeout_s``: a process whose peer died
    or hangs fails instead of waiting for ever (torchrun then stops the others)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(train.device)
    if world_size == 1:
        yield Ranks(device=device)
        return
    local_batch_size(train.batch_size, world_size)
    # A PyTorchJob that starts one process per pod without torchrun sets no LOCAL_RANK.
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=timedelta(seconds=train.process_group_timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    log.info("process %d of %d on %s", rank, world_size, device)
    try:
        yield Ranks(rank, world_size, local_rank, device)
    finally:
        dist.destroy_process_group()


def data_parallel(model: nn.Module, ranks: Ranks) -> nn.Module:
    """``model`` as the processes train it together: itself for one process, else wrapped in
    DistributedDataParallel (its gradients averaged over the processes after every backward).

    Only trainable tensors take part (a frozen backbone's are ignored); ``static_graph``: the
    same tensors are used in every step, which also allows trainable tensors a forward never
    uses. Buffers are synchronised once, at the start, not before every forward: a frozen
    backbone's never change, and BatchNorms that train are synchronised (SyncBatchNorm, on GPUs)."""
    if not ranks.distributed:
        return model
    norms = _training_batch_norms(model)
    if norms and ranks.device.type != "cuda":
        raise ConfigError(
            f"model.method={getattr(model, 'method', '?')} trains BatchNorm layers ({', '.join(norms[:3])}); "
            f"{ranks.world_size} CPU processes would each normalise with their own share of the batch "
            "(SyncBatchNorm needs GPUs): train this model in one process, or on GPUs"
        )
    if norms:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False, static_graph=True)


def _training_batch_norms(model: nn.Module) -> list[str]:
    """The BatchNorm layers that use batch statistics when ``model`` trains (a frozen backbone's
    stay in eval mode, see ``AdaptedModel.train``)."""
    was_training = model.training
    model.train()
    names = [name for name, module in model.named_modules() if isinstance(module, BATCH_NORMS) and module.training]
    model.train(was_training)
    return names


class GlobalBatch:
    """``(step, logits, targets)`` of this process's share of a global batch -> the whole global
    batch's logits and targets, in one process's order, as the loss wants them.

    The training sampler (``DistributedSampler`` order) gives process r the global positions
    ``r, r + N, r + 2N, ...`` of the epoch, padded with repeated samples to a multiple of N; so
    the shares interleave back into one process's order, and the padding is what lies beyond the
    epoch's ``samples`` in its last batch. Every process then computes the same loss over the
    global batch; the gather's backward sums every process's gradient for its share (N times
    the loss's), which DistributedDataParallel's average turns back into one process's gradient.
    """

    def __init__(self, samples: int, batch_size: int) -> None:
        self.samples, self.batch_size = samples, batch_size

    def __call__(self, step: int, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        group = dist.group.WORLD
        real = min(self.batch_size, self.samples - (step - 1) * self.batch_size)
        gathered_logits = _interleave(functional.all_gather_single_autograd(logits.contiguous(), 0, group), logits)
        gathered_targets = _interleave(functional.all_gather_single(targets.contiguous(), 0, group), targets)
        return gathered_logits[:real], gathered_targets[:real]


def _interleave(gathered: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """The shares, gathered in rank order, in the batch's order: process r's j-th sample is the
    batch's sample ``j * N + r``."""
    return gathered.reshape(-1, *share.shape).transpose(0, 1).flatten(0, 1)
