"""AdamW with per-tensor weight decay and the warm-up + cosine schedule, shared by the train and
pretrain steps so both optimise exactly alike."""

from __future__ import annotations

from typing import Literal

import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

# Tensors that are not weights of a linear map even when they have two dimensions: prompts and
# (prompt) position embeddings are inputs, gates are scalars; decaying them pulls the model
# towards "no adaptation" rather than regularising it.
NO_DECAY_NAMES = ("prompt", "pos_embed", "gate", "cls_token")


def decays(name: str, param: torch.Tensor) -> bool:
    """timm's rule (no decay on 1-D tensors: biases, norms) plus prompts, embeddings and gates."""
    return param.ndim > 1 and not any(part in name for part in NO_DECAY_NAMES)


def parameter_groups(model: nn.Module, weight_decay: float, on: Literal["weights", "all"]) -> list[dict]:
    """The trainable tensors as AdamW groups: decayed and not (``on="all"``: one decayed group)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if on == "all":
        return [{"params": [p for _, p in named], "weight_decay": weight_decay}]
    groups = [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   on: Literal["weights", "all"] = "weights") -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, weight_decay, on), lr=lr)


def make_scheduler(optimizer: torch.optim.Optimizer, lr: float, epochs: int, warmup_epochs: int,
                   steps_per_epoch: int) -> CosineLRScheduler:
    """Per-step linear warm-up from lr/1000 to exactly ``lr``, then a cosine to zero over the
    remaining steps (``warmup_prefix``: the cosine starts where the warm-up ends, so the peak is
    reached; the released code's scheduler drops to 0 after the first epoch, this one does not).
    At least one epoch always follows the warm-up."""
    warmup_steps = min(warmup_epochs, epochs - 1) * steps_per_epoch
    return CosineLRScheduler(
        optimizer,
        t_initial=epochs * steps_per_epoch - warmup_steps,
        warmup_t=warmup_steps,
        warmup_lr_init=lr * 1e-3,
        warmup_prefix=True,
        t_in_epochs=False,
    )
