"""Module surgery shared by the methods that adapt a timm backbone in place.

SSF and LoRA swap selected layers of the backbone for wrappers that hold the frozen layer plus a few
trainable tensors (AdaptFormer and VPT on Swin do the same to blocks and attention modules), so
timm's own ``forward_features`` runs the adapted network unchanged, for ViT and Swin alike. SSF and
LoRA are linear in the frozen weights, so their wrappers fold back into plain layers of the
original type for inference.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from dvpt_core.models.adapted import AdapterLayer
from dvpt_core.peft.linear import LinearProbe


class MergeableLayer(AdapterLayer):
    """A wrapper whose effect can be folded into the frozen module it wraps."""

    def merged(self) -> nn.Module:
        """A new module of the wrapped module's type computing what this wrapper computes."""
        raise NotImplementedError


def swap_modules(root: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> None:
    """Replace every submodule for which ``make(name, module)`` returns a module.

    Candidates are collected on the original tree first, so a wrapper is never wrapped again.
    """
    chosen = [(name, make(name, module)) for name, module in root.named_modules() if name]
    chosen = [(name, new) for name, new in chosen if new is not None]
    for name, new in chosen:
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent), child, new)
    if not chosen:
        raise TypeError(f"{type(root).__name__} has no module this method can adapt")


def merged_copy(backbone: nn.Module) -> nn.Module:
    """A deep copy of ``backbone`` with every mergeable wrapper folded into a plain module."""
    clone = copy.deepcopy(backbone)
    swap_modules(clone, lambda _, module: module.merged() if isinstance(module, MergeableLayer) else None)
    return clone


class MergeableModel(LinearProbe):
    """A method whose wrappers all fold away (SSF, LoRA)."""

    def merge(self) -> LinearProbe:
        """The same function as a linear probe on a merged copy of the backbone: no wrapper left,
        every module of its original timm type. The adapter's provenance (``info``) is kept."""
        merged = LinearProbe(merged_copy(self.backbone), self.info, self.classifier.out_features)
        merged.classifier.load_state_dict(self.classifier.state_dict())
        return merged.train(self.training)
