"""Cost of every PEFT method, side by side in one run: training step time, peak training memory,
batch-1 inference latency, trainable parameters and adapter bytes, each also as a ratio to full
fine-tuning.

Each method is measured in a fresh subprocess so that peak memory belongs to that method alone:
on CUDA ``max_memory_allocated``; on the CPU the process's peak RSS less its RSS after importing
the libraries (the task's loss included) and before building the model (the interpreter and
libraries, the same for every method, would otherwise dilute every ratio). The step is the train
step's: forward, the task's loss (cross-entropy for classification; 0.5 CE + 0.5 Dice, MONAI's,
for segmentation), backward, AdamW. Weights are random: cost does not depend on their values.

    python benchmarks/cost.py --config small            # ViT-S/16 at 128: minutes on a 2-core CPU
    python benchmarks/cost.py --config vit-b16          # ViT-B/16 at 224, batch 8
    python benchmarks/cost.py --config segformer-small  # MiT-B0 SegFormer at 256: minutes on a 2-core CPU
    python benchmarks/cost.py --config segformer-b4     # the paper's Table 2 setting (a GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# Table 2's model: SegFormer on 2-class polyp segmentation (data.format=kvasir sets the task and
# classes) with the DVPT authors' decoder layout, whose counts the table prints.
SEGFORMER = ["data.format=kvasir", "model.segformer.decoder=released"]
# Every method that applies to SegFormer (shallow VPT does not: no token sequence to prepend to),
# DVPT at both sharing settings.
SEGFORMER_METHODS = ["full", "linear", "vpt_deep", "ssf", "adaptformer", "lora", "evp", "dvpt-s1", "dvpt-s2"]
# Table 2 (SegFormer-B4, 512 x 512, one RTX 3090): training memory in GB per method. The paper's
# "DVPT (s=1)" count matches our s=2 and its "s=2" count no setting (dvpt_core/peft/dvpt_segformer.py),
# so its memory labels may not match our s either.
TABLE2_MEMORY_GB = {"full": 12.03, "linear": 4.59, "vpt_deep": 10.30, "ssf": 13.85, "evp": 10.79,
                    "adaptformer": 10.54, "dvpt-s2": 9.61, "dvpt-s1": 10.80}
CONFIGS = {
    "small": {"backbone": "vit_small_patch16_224", "image_size": 128, "batch": 8},
    "vit-b16": {"backbone": "vit_base_patch16_224", "image_size": 224, "batch": 8},
    # MiT-B0 (3.7M weights), the smallest SegFormer, at 256 px.
    "segformer-small": {"backbone": "nvidia/segformer-b0-finetuned-ade-512-512", "image_size": 256, "batch": 8,
                        "settings": SEGFORMER, "methods": SEGFORMER_METHODS, "paper_memory_gb": TABLE2_MEMORY_GB},
    # The paper's Table 2 setting: SegFormer-B4 at 512, batch 16 (section 4.1.3, polyp segmentation).
    "segformer-b4": {"backbone": "nvidia/segformer-b4-finetuned-ade-512-512", "image_size": 512, "batch": 16,
                     "settings": SEGFORMER, "methods": SEGFORMER_METHODS, "paper_memory_gb": TABLE2_MEMORY_GB},
}
# Methods measured under their own name: a model.method and the settings that make the variant.
VARIANTS = {"dvpt-s1": ("dvpt", ["model.segformer.share_every=1"]),
            "dvpt-s2": ("dvpt", ["model.segformer.share_every=2"])}
TARGETS = {"step_time": 0.80, "peak_memory": 0.75, "adapter_fraction": 0.006}


def measure(name: str, config: str, steps: int, warmup: int, device: str, batch: int | None = None) -> dict:
    """Runs inside the worker subprocess: method (or variant) ``name`` on ``config``."""
    import torch
    from safetensors.torch import save

    from dvpt_core.config import load_config
    from dvpt_core.peft import build_model, count_parameters
    from dvpt_core.tasks import get_task

    spec = {**CONFIGS[config], **({"batch": batch} if batch else {})}
    method, variant = VARIANTS.get(name, (name, []))
    cfg = load_config(None, [
        f"model.backbone={spec['backbone']}", "model.weights=random", f"model.image_size={spec['image_size']}",
        *spec.get("settings", []), *variant, f"model.method={method}",
    ])
    task = get_task(cfg.data.task)
    loss_fn = task.loss()  # built before the baseline: MONAI's import is a library's memory, not the method's
    libraries_rss = _current_rss_mb()
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(cfg).to(dev)
    counts = count_parameters(model)
    size, classes = spec["image_size"], cfg.data.num_classes
    images = torch.randn(spec["batch"], 3, size, size, device=dev)
    # A class index per logit but over the class axis: one label per image, or a label map.
    target_shape = task.logits_shape(spec["batch"], size, classes)
    del target_shape[1]
    targets = torch.randint(0, classes, target_shape, device=dev)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), targets).backward()
        optimizer.step()

    model.train()
    step_times = _timed(step, steps, warmup, dev)
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else _peak_rss_mb() - libraries_rss
    model.eval()
    one = images[:1]
    with torch.no_grad():
        latencies = _timed(lambda: model(one), max(steps, 10), warmup, dev)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    full_checkpoint = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "method": name, "model_method": method, "variant": variant, "config": config, "device": device,
        "backbone": spec["backbone"], "image_size": size, "batch": spec["batch"], "task": task.name, **counts,
        "step_time_s": statistics.median(step_times),
        "peak_memory_mb": peak, "libraries_rss_mb": libraries_rss if dev.type == "cpu" else None,
        "latency_b1_ms": 1000 * statistics.median(latencies),
        "adapter_bytes": len(save(tensors)), "full_checkpoint_bytes": full_checkpoint,
    }


def _timed(fn, repeats: int, warmup: int, device) -> list[float]:
    import torch

    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


def with_ratios(rows: list[dict], paper_memory_gb: dict[str, float] | None = None) -> list[dict]:
    """Each row's figures as ratios to full fine-tuning's, and beside them the paper's memory ratio
    for the same method where the configuration names the paper's figures."""
    full = next((r for r in rows if r["method"] == "full"), None)
    for row in rows:
        row["adapter_fraction"] = row["adapter_bytes"] / row["full_checkpoint_bytes"]
        if full:
            row["step_time_ratio"] = row["step_time_s"] / full["step_time_s"]
            row["peak_memory_ratio"] = row["peak_memory_mb"] / full["peak_memory_mb"]
            row["latency_ratio"] = row["latency_b1_ms"] / full["latency_b1_ms"]
        if paper_memory_gb and row["method"] in paper_memory_gb:
            row["paper_memory_gb"] = paper_memory_gb[row["method"]]
            row["paper_memory_ratio"] = paper_memory_gb[row["method"]] / paper_memory_gb["full"]
    return rows


COLUMNS = ["method", "trainable", "adapter MB", "adapter / checkpoint", "step s", "step x full", "peak MB",
           "peak x full", "paper peak x full", "latency b1 ms", "latency x full"]


def cells(r: dict) -> list[str]:
    nan = float("nan")
    paper = f"{r['paper_memory_ratio']:.2f} ({r['paper_memory_gb']:.2f} GB)" if "paper_memory_ratio" in r else "-"
    return [r["method"], f"{r['trainable']:,}", f"{r['adapter_bytes'] / 2**20:.2f}", f"{r['adapter_fraction']:.3%}",
            f"{r['step_time_s']:.3f}", f"{r.get('step_time_ratio', nan):.2f}", f"{r['peak_memory_mb']:.0f}",
            f"{r.get('peak_memory_ratio', nan):.2f}", paper, f"{r['latency_b1_ms']:.1f}",
            f"{r.get('latency_ratio', nan):.2f}"]


def table(rows: list[dict]) -> str:
    """A plain-text table for the terminal."""
    body = [COLUMNS, *(cells(r) for r in rows)]
    widths = [max(len(row[i]) for row in body) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in body]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def markdown(rows: list[dict]) -> str:
    """The same table in Markdown (for benchmarks/README.md)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(cells(r)) + " |" for r in rows]) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "step_time_s", "training step time (s)"),
                           (axes[1], "peak_memory_mb", "peak training memory (MB)")):
        for r in rows:
            ax.scatter(r["trainable"], r[key], s=40)
            ax.annotate(r["method"], (r["trainable"], r[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: str, methods: list[str], steps: int, warmup: int, device: str, batch: int | None) -> list[dict]:
    rows = []
    for method in methods:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", method, "--config", config, "--steps", str(steps),
             "--warmup", str(warmup), "--device", device, *(["--batch", str(batch)] if batch else [])],
            capture_output=True, text=True, check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{method} on {config} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  measured {method}", file=sys.stderr)
    return with_ratios(rows, CONFIGS[config].get("paper_memory_gb"))


def config_methods(config: str, asked: list[str] | None) -> list[str]:
    """``asked`` (default: the configuration's methods, else every method), full fine-tuning first;
    a name that is neither a method nor a variant is refused."""
    from dvpt_core.peft import METHODS

    methods = asked or CONFIGS[config].get("methods", list(METHODS))
    unknown = [m for m in methods if m not in METHODS and m not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; known: {[*METHODS, *VARIANTS]}")
    return ["full", *[m for m in methods if m != "full"]]


def main() -> None:
    from dvpt_core.data.atomic import atomic_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="small")
    parser.add_argument("--methods", nargs="*", help="methods or variants (default: the configuration's; "
                        f"variants: {', '.join(VARIANTS)})")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, help="the training batch (default: the configuration's)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.config, args.steps, args.warmup, args.device, args.batch)))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    for config in CONFIGS if args.config == "all" else [args.config]:
        rows = run(config, config_methods(config, args.methods), args.steps, args.warmup, args.device, args.batch)
        first = rows[0]
        title = f"{first['backbone']} @ {first['image_size']}, batch {first['batch']}, {args.device}"
        print(f"\n{title}\n{table(rows)}\n\n{markdown(rows)}")
        for dvpt in (r for r in rows if r["model_method"] == "dvpt" and "step_time_ratio" in r):
            print(f"targets for {dvpt['method']}: step {dvpt['step_time_ratio']:.2f}x (<= {TARGETS['step_time']}), "
                  f"memory {dvpt['peak_memory_ratio']:.2f}x (<= {TARGETS['peak_memory']}), "
                  f"adapter {dvpt['adapter_fraction']:.3%} (<= {TARGETS['adapter_fraction']:.1%})")
        stem = RESULTS / f"cost-{config}-{args.device}"
        with atomic_file(stem.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps({"config": config, "title": title, "load_average": os.getloadavg(),
                                       "cpu_count": os.cpu_count(), "steps": args.steps, "warmup": args.warmup,
                                       "rows": rows}, indent=2))
        plot(rows, stem.with_suffix(".png"), title)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
