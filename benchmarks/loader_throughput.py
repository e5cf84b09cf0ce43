"""Does the input pipeline keep up with training? Loader images/s vs training-step images/s.

Measured side by side in one process, at the settings of ``params.yaml`` (the default experiment:
DVPT on vit_tiny at 128 px, batch 32, ``train.num_workers`` loader workers):

1. loader: the training DataLoader (``dvpt_core.data.dataset.make_loader``, shuffled, with the
   training augmentation: random resized crop and flips) over the preprocessed memory-mapped cache
   of the train split, iterated for several epochs; the clock starts after the first batch, so
   worker start-up is reported separately;
2. training step: ``dvpt_core.engine.train_one_epoch`` (forward, loss, backward, clipping, AdamW
   step, exactly as the train step runs it) on batches already on the device, so no loading is
   timed;
3. end to end: ``train_one_epoch`` fed by the loader itself, which shows whether loading stalls
   training at all.

Loader and training rates are measured in short interleaved rounds (medians reported; the ratio
is the median of the rounds' ratios), so that load from other processes on a shared machine hits
both alike. The target is loader >= 3x training. It prints a table and writes the figures as JSON to
``benchmarks/results/`` (gitignored). It is a benchmark, not a test: nothing fails on a miss.

    .venv/bin/python benchmarks/loader_throughput.py                      # synthetic data, params.yaml
    .venv/bin/python benchmarks/loader_throughput.py --cache outputs/cache --set train.num_workers=2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

# Progress bars of the loops being timed would only clutter the table (read when tqdm is imported).
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from dvpt_core.config import ExperimentConfig, load_config  # noqa: E402
from dvpt_core.data.dataset import make_loader  # noqa: E402
from dvpt_core.engine import train_one_epoch  # noqa: E402
from dvpt_core.peft import build_model, count_parameters  # noqa: E402
from dvpt_core.runtime import resolve_device, seed_everything  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET_RATIO = 3.0


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = load_config(args.params, args.overrides)
    with tempfile.TemporaryDirectory(prefix="dvpt-bench-") as scratch:
        cache = args.cache or _synthetic_cache(cfg, Path(scratch))
        result = run(cfg, cache / "train", args.loader_images, args.train_steps, args.warmup_steps, args.rounds)
    result["cache"] = str(args.cache) if args.cache else f"synthetic ({cfg.synthetic.train} train images, generated)"
    result["params"] = str(args.params)
    result["overrides"] = args.overrides
    print(table(result))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"loader_throughput-{stamp}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cache", type=Path, help="an existing preprocess cache (default: build one from "
                        "the synthetic dataset in a temporary directory)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved loader/training measurements")
    parser.add_argument("--loader-images", type=int, default=640, help="images the loader delivers per round")
    parser.add_argument("--train-steps", type=int, default=4, help="timed training steps per round")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed training steps first")
    return parser


def _synthetic_cache(cfg: ExperimentConfig, scratch: Path) -> Path:
    """The default dataset, generated and preprocessed exactly as ``make run`` does."""
    from dvpt_core.data.synthetic.ddr import generate_ddr
    from dvpt_core.steps.preprocess import preprocess
    from dvpt_core.steps.validate import validate

    generate_ddr(scratch / "data", cfg.synthetic, cfg.data.class_names)
    validate(cfg, scratch / "data", scratch / "validation")
    preprocess(cfg, scratch / "data", scratch / "cache", scratch / "validation")
    return scratch / "cache"


def run(cfg: ExperimentConfig, split_dir: Path, loader_images: int, train_steps: int, warmup_steps: int,
        rounds: int) -> dict:
    """``rounds`` interleaved (loader, training step) measurements, then one end-to-end pass.

    Interleaving makes both rates see the same machine: on a shared host a burst of load elsewhere
    lands in both halves of a round instead of skewing one of them. Rates are medians over rounds;
    the ratio is the median of the rounds' ratios.
    """
    generator = seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg).to(device)
    info = model.info

    def loader() -> torch.utils.data.DataLoader:
        return make_loader(split_dir, info.mean, info.std, True, cfg, generator=generator)

    batches = _device_batches(loader(), device, count=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    load_before = os.getloadavg()
    loading, training = [], []
    for _ in range(rounds):
        loading.append(measure_loader(loader(), loader_images))
        training.append(measure_training(model, optimizer, batches, device, cfg, warmup_steps, train_steps))
        warmup_steps = 0  # the model is warm after the first round
    end_to_end = measure_end_to_end(model, optimizer, loader(), device, cfg, train_steps)
    load_after = os.getloadavg()
    loader_rate = statistics.median(r["images_per_s"] for r in loading)
    train_rate = statistics.median(r["images_per_s"] for r in training)
    per_round = [a["images_per_s"] / b["images_per_s"] for a, b in zip(loading, training)]
    # Each round's two rates were measured seconds apart, under the same outside load: the median
    # of the per-round ratios is the figure least moved by load bursts elsewhere on the machine.
    ratio = statistics.median(per_round)
    return {
        "loader": {"images_per_s": loader_rate, "rounds": loading},
        "training_step": {"images_per_s": train_rate, "rounds": training},
        "end_to_end": end_to_end,
        "ratio_loader_to_training": ratio,
        "ratio_of_median_rates": loader_rate / train_rate,
        "ratio_per_round": per_round,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "setting": {
            "backbone": cfg.model.backbone,
            "method": cfg.model.method,
            "image_size": cfg.model.image_size,
            "prompts": cfg.model.prompts,
            "batch_size": cfg.train.batch_size,
            "num_workers": cfg.train.num_workers,
            "amp": cfg.train.amp,
            "augmentation": {"crop_scale": list(cfg.train.crop_scale), "hflip": cfg.train.hflip,
                             "vflip": cfg.train.vflip},
            "random_weights": info.random_weights,
            **count_parameters(model),
        },
        "machine": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min": {"before": load_before[0], "after": load_after[0]},
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def measure_loader(loader: torch.utils.data.DataLoader, images: int) -> dict:
    """Images/s the loader delivers after its first batch, over as many epochs as ``images`` needs."""
    start = time.perf_counter()
    first_batch_s, delivered, batches = None, 0, 0
    timed_from = start
    while delivered < images:
        for batch, _ in loader:
            now = time.perf_counter()
            if first_batch_s is None:
                first_batch_s, timed_from = now - start, now
            else:
                delivered += len(batch)
                batches += 1
            if delivered >= images:
                break
    elapsed = time.perf_counter() - timed_from
    return {"images": delivered, "batches": batches, "seconds": elapsed, "images_per_s": delivered / elapsed,
            "first_batch_s": first_batch_s, "dataset_images": len(loader.dataset)}


def _device_batches(loader: torch.utils.data.DataLoader, device: torch.device, count: int) -> list:
    batches = []
    for images, labels in loader:
        batches.append((images.to(device), labels.to(device)))
        if len(batches) == count:
            break
    return batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(model, optimizer, batches, device, cfg: ExperimentConfig, steps: int) -> None:
    train_one_epoch(model, batches, optimizer, lambda step: None, device, amp=cfg.train.amp,
                    grad_clip=cfg.train.grad_clip, max_steps=steps, desc="benchmark")


def measure_training(model, optimizer, batches: list, device: torch.device, cfg: ExperimentConfig,
                     warmup: int, steps: int) -> dict:
    """Images/s of the train step's own loop on batches already materialised on the device."""
    cycle = [batches[i % len(batches)] for i in range(max(steps, warmup))]
    if warmup:
        _train(model, optimizer, cycle[:warmup], device, cfg, warmup)
    _sync(device)
    start = time.perf_counter()
    _train(model, optimizer, cycle[:steps], device, cfg, steps)
    _sync(device)
    elapsed = time.perf_counter() - start
    images = sum(len(labels) for _, labels in cycle[:steps])
    return {"steps": steps, "images": images, "seconds": elapsed, "images_per_s": images / elapsed,
            "seconds_per_step": elapsed / steps}


def measure_end_to_end(model, optimizer, loader, device: torch.device, cfg: ExperimentConfig, steps: int) -> dict:
    """The same loop fed by the loader (first batch included, as in a real epoch)."""
    steps = min(steps, len(loader))
    _sync(device)
    start = time.perf_counter()
    _train(model, optimizer, loader, device, cfg, steps)
    _sync(device)
    elapsed = time.perf_counter() - start
    images = min(steps * cfg.train.batch_size, len(loader.dataset))
    return {"steps": steps, "images": images, "seconds": elapsed, "images_per_s": images / elapsed}


def table(result: dict) -> str:
    s, m = result["setting"], result["machine"]
    rows = [
        ("loader (train split, augmented, mmap cache)", result["loader"]["images_per_s"]),
        (f"training step ({s['method']}, {s['backbone']} @ {s['image_size']})",
         result["training_step"]["images_per_s"]),
        ("end to end (training fed by the loader)", result["end_to_end"]["images_per_s"]),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"device {m['device']} ({m['device_name']}), {m['cpu_count']} CPUs, {m['torch_threads']} torch threads; "
        f"batch {s['batch_size']}, num_workers {s['num_workers']}, amp {s['amp']}"
        + (", RANDOM WEIGHTS (speed only)" if s["random_weights"] else ""),
        f"{'measurement'.ljust(width)}  images/s",
        f"{'-' * width}  --------",
        *(f"{name.ljust(width)}  {value:8.1f}" for name, value in rows),
        f"{'-' * width}  --------",
        f"{'ratio loader / training (median of rounds)'.ljust(width)}  {result['ratio_loader_to_training']:7.1f}x  "
        f"(target >= {result['target_ratio']:.0f}x: {'met' if result['meets_target'] else 'NOT met'})",
        f"per round: " + ", ".join(f"{r:.1f}x" for r in result["ratio_per_round"])
        + f"; load average {m['load_average_1min']['before']:.1f} -> {m['load_average_1min']['after']:.1f}"
        + f"; loader first batch {result['loader']['rounds'][0]['first_batch_s']:.2f} s (not in the rate)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
