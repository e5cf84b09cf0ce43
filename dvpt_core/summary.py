"""``dvpt summary``: what a method trains and what its adapter weighs, without training."""

from __future__ import annotations

from collections import Counter

from safetensors.torch import save

from dvpt_core.config import ExperimentConfig
from dvpt_core.peft import build_model, count_parameters


def summarize(cfg: ExperimentConfig) -> dict:
    """Counts come from the built model; adapter bytes from serialising its trainable tensors."""
    model = build_model(cfg)
    counts = count_parameters(model)
    tensors = {k: v.contiguous() for k, v in model.trainable_state_dict().items()}
    by_part: Counter[str] = Counter()
    for name, tensor in tensors.items():
        by_part[name.split(".")[0]] += tensor.numel()
    return {
        "backbone": cfg.model.backbone,
        "method": cfg.model.method,
        "num_classes": cfg.data.num_classes,
        **counts,
        "trainable_percent": 100.0 * counts["trainable"] / counts["total"],
        "adapter_bytes": len(save(tensors)),
        "trainable_by_part": dict(by_part),
    }
