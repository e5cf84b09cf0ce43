"""The training and inference loops, free of any tracking or file I/O."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from dvpt_core.runtime import autocast

# (step, logits, targets) of this process's share of a batch -> the whole batch's logits and targets.
Gather = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    on_step: Callable[[int], None],
    device: torch.device,
    *,
    amp: bool = False,
    grad_clip: float | None = None,
    max_steps: int | None = None,
    desc: str = "train",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
    gather: Gather | None = None,
) -> float:
    """One pass; ``on_step`` receives the optimiser step count (for per-step LR schedules).
    ``loss_fn(logits, targets)``: the task's loss (``dvpt_core.tasks``), cross-entropy by default.
    ``gather(step, logits, targets)``: where each process holds a share of the batch
    (``dvpt_core.distributed.GlobalBatch``), the whole batch's, so the loss and the returned mean
    loss are one process's."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total, seen = 0.0, 0
    # disable=None: bars on a terminal, none in logs and CI output.
    progress = tqdm(batches, desc=desc, leave=False, total=_length(batches, max_steps), disable=None)
    for step, (images, labels) in enumerate(progress, start=1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images).float()
            if gather is not None:
                logits, labels = gather(step, logits, labels)
            loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        on_step(step)
        total += loss.item() * len(labels)
        seen += len(labels)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if max_steps and step >= max_steps:
            break
    return total / max(seen, 1)


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    amp: bool = False,
    desc: str = "predict",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Float32 logits and targets batch by batch, both on ``device``, so a caller can reduce each
    batch there before the next (a segmentation split's logits would not fit in memory at once)."""
    model.eval()
    for images, target in tqdm(batches, desc=desc, leave=False, disable=None):
        with autocast(device, amp):
            logits = model(images.to(device)).float()
        yield logits, target.to(device)


def predict(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    amp: bool = False,
    desc: str = "predict",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the CPU) and labels for every batch, concatenated."""
    pairs = [(logits.cpu(), labels.cpu()) for logits, labels in predict_batches(model, batches, device, amp=amp,
                                                                                   desc=desc)]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def _length(batches: Iterable, max_steps: int | None) -> int | None:
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return max_steps
    return min(n, max_steps) if max_steps else n
