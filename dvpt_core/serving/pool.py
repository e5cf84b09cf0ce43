"""One frozen backbone in memory, many task adapters over it, swapped without a restart.

An adapter is a few small modules (DVPT's bottlenecks and prompts, a head) that the method's
model class wraps around the backbone without changing it, so every adapter's model can hold the
very same backbone object: loading one costs its own tensors only, and a swap builds the new
wrapper beside the live one and replaces a dictionary entry, which requests read once. A
request in flight keeps the adapter it started with; the next one gets the new adapter. Methods
that rewrite the backbone's own layers (LoRA, SSF, AdaptFormer, full fine-tuning, VPT on Swin)
cannot share it and are refused (``SHARED_BACKBONE``); serve them from their ONNX graph.

Before an adapter goes live it is checked against the loaded backbone: same architecture and
the same weights fingerprint (``dvpt_core.peft.adapter.apply_adapter``); ONNX graphs carry their
own weights, and their version's recorded fingerprint must match too.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from dvpt_core.models.backbone import BackboneInfo, create_backbone
from dvpt_core.models.blocks import architecture
from dvpt_core.models.classifier import AdaptedClassifier
from dvpt_core.peft import METHODS
from dvpt_core.peft.adapter import AdapterError, adapter_experiment, apply_adapter
from dvpt_core.serving.predictor import Predictor, onnx_forward, torch_forward
from dvpt_core.serving.sources import ModelSource, current_version, onnx_file, resolve

log = logging.getLogger(__name__)
# (method, architecture) whose model wraps the backbone without modifying it.
SHARED_BACKBONE = frozenset({("dvpt", "vit"), ("dvpt", "swin"), ("linear", "vit"), ("linear", "swin"),
                             ("vpt_shallow", "vit"), ("vpt_deep", "vit"), ("evp", "vit")})
RUNTIMES = ("torch", "onnx")


class SharedBackbone:
    """The frozen backbone every adapter of the pool wraps."""

    def __init__(self, source: ModelSource, weights_file: Path | None = None) -> None:
        overrides = {"weights_file": str(weights_file)} if weights_file else None
        model_cfg = adapter_experiment(source.adapter_dir, overrides).model
        self.backbone, self.info = create_backbone(model_cfg)
        self.arch = architecture(self.backbone)
        self._frozen = {id(module) for module in self.backbone.modules()}

    def attach(self, adapter_dir: Path) -> AdaptedClassifier:
        """The adapter's model over this backbone, its tensors loaded and verified."""
        cfg = adapter_experiment(adapter_dir)
        method = cfg.model.method
        if (method, self.arch) not in SHARED_BACKBONE:
            shared = ", ".join(sorted(f"{m} ({a})" for m, a in SHARED_BACKBONE))
            raise AdapterError(f"adapter {adapter_dir}: method {method} rewrites the {self.arch} backbone's own "
                               f"layers, so it cannot share one backbone; shared-backbone methods: {shared}. "
                               "Serve it with runtime onnx instead")
        model = apply_adapter(METHODS[method][self.arch](self.backbone, self.info, cfg.model, cfg.data.num_classes),
                              adapter_dir)
        # model.eval() would walk the whole frozen backbone three times (AdaptedClassifier.train),
        # a fifth of a swap on ViT-B; the backbone is in eval mode and no pool model ever leaves it.
        for module in model.modules():
            if id(module) not in self._frozen:
                module.training = False
        return model


@dataclass(frozen=True)
class LiveAdapter:
    """An adapter taking requests: where it came from, how it predicts, what it cost to swap in."""

    name: str
    source: ModelSource
    runtime: str
    predictor: Predictor
    model: nn.Module | None
    loaded_at: float
    swap_ms: float

    def describe(self) -> dict:
        meta = self.source.meta
        return {"name": self.name, "uri": self.source.uri, "registered_model": self.source.name,
                "version": self.source.version, "runtime": self.runtime, "method": meta["method"],
                "backbone": meta["backbone"], "backbone_fingerprint": meta["backbone_fingerprint"],
                "class_names": meta["class_names"], "random_weights": meta.get("random_weights", False),
                "stand_in_weights": meta.get("stand_in", False), "loaded_at": self.loaded_at,
                "swap_ms": round(self.swap_ms, 3)}


class AdapterPool:
    """Named live adapters over one lazily loaded backbone (the first PyTorch adapter's)."""

    def __init__(self, cache_dir: Path, weights_file: Path | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.weights_file = weights_file
        self.backbone: SharedBackbone | None = None
        self._live: dict[str, LiveAdapter] = {}
        self._loading = threading.Lock()

    @property
    def info(self) -> BackboneInfo | None:
        return self.backbone.info if self.backbone else None

    def get(self, name: str) -> LiveAdapter:
        try:
            return self._live[name]
        except KeyError:
            raise KeyError(f"no adapter {name!r}; live: {sorted(self._live)}") from None

    def live(self) -> list[LiveAdapter]:
        return list(self._live.values())

    def load(self, name: str, uri: str, runtime: str = "torch") -> LiveAdapter:
        """Resolve, verify and swap in ``uri`` as adapter ``name``; the previous one (if any)
        keeps serving until the new one is ready, and keeps serving if loading fails."""
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime {runtime!r} is not one of {RUNTIMES}")
        with self._loading:
            source = resolve(uri, self.cache_dir)
            return self.swap_in(name, source, runtime)

    def swap_in(self, name: str, source: ModelSource, runtime: str = "torch") -> LiveAdapter:
        """Build ``source`` over the backbone and make it live; the timed part of a swap."""
        started = time.perf_counter()
        meta = source.meta
        if runtime == "torch":
            if self.backbone is None:
                self.backbone = SharedBackbone(source, self.weights_file)
            model = self.backbone.attach(source.adapter_dir)
            predictor = Predictor(meta, torch_forward(model))
        else:
            if self.info is not None and meta["backbone_fingerprint"] != self.info.fingerprint:
                raise AdapterError(f"{source.uri}: its graph was exported from backbone weights "
                                   f"{meta['backbone_fingerprint'][:12]}, not the served {self.info.fingerprint[:12]}")
            model = None
            predictor = Predictor(meta, onnx_forward(onnx_file(source, self.cache_dir)))
        adapter = LiveAdapter(name, source, runtime, predictor, model, time.time(),
                              (time.perf_counter() - started) * 1000)
        self._live[name] = adapter
        log.info("adapter %s: %s version %s live (%s, %.1f ms)", name, source.name or source.uri, source.version,
                 runtime, adapter.swap_ms)
        return adapter

    def refresh(self) -> list[str]:
        """Swap in every alias-bound adapter whose alias moved (a newly promoted champion);
        returns the names swapped. A failed load leaves the old adapter live."""
        swapped = []
        for adapter in self.live():
            source = adapter.source
            if source.alias is None:
                continue
            try:
                now = current_version(source.uri)
                if now is not None and now != source.version:
                    self.load(adapter.name, source.uri, adapter.runtime)
                    swapped.append(adapter.name)
            except Exception as err:  # noqa: BLE001  (the watcher must outlive any registry or load error)
                log.error("adapter %s: could not swap in the new version of %s: %s", adapter.name, source.uri, err)
        return swapped
