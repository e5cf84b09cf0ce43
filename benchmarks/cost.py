"""Cost of every PEFT method, side by side in one run: training step time, peak training memory,
batch-1 inference latency, trainable parameters and adapter bytes, each also as a ratio to full
fine-tuning.

Each method is measured in a fresh subprocess so that peak memory belongs to that method alone:
on CUDA ``max_memory_allocated``; on the CPU the process's peak RSS less its RSS after importing
torch and before building the model (the interpreter and libraries, the same for every method,
would otherwise dilute every ratio). Weights are random: cost does not depend on their values.

    python benchmarks/cost.py --config small          # minutes on a 2-core CPU
    python benchmarks/cost.py --config vit-b16        # ViT-B/16 at 224, batch 8
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "small": {"backbone": "vit_small_patch16_224", "image_size": 128, "batch": 8},
    "vit-b16": {"backbone": "vit_base_patch16_224", "image_size": 224, "batch": 8},
}
TARGETS = {"step_time": 0.80, "peak_memory": 0.75, "adapter_fraction": 0.006}


def measure(method: str, config: str, steps: int, warmup: int, device: str) -> dict:
    """Runs inside the worker subprocess."""
    import torch
    from safetensors.torch import save

    from dvpt_core.config import load_config
    from dvpt_core.peft import build_model, count_parameters

    libraries_rss = _current_rss_mb()
    spec = CONFIGS[config]
    cfg = load_config(None, [
        f"model.backbone={spec['backbone']}", "model.weights=random", f"model.image_size={spec['image_size']}",
        f"model.method={method}",
    ])
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(cfg).to(dev)
    counts = count_parameters(model)
    images = torch.randn(spec["batch"], 3, spec["image_size"], spec["image_size"], device=dev)
    labels = torch.randint(0, cfg.data.num_classes, (spec["batch"],), device=dev)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
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
        "method": method, "config": config, "device": device, **spec, **counts,
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


def with_ratios(rows: list[dict]) -> list[dict]:
    full = next((r for r in rows if r["method"] == "full"), None)
    for row in rows:
        row["adapter_fraction"] = row["adapter_bytes"] / row["full_checkpoint_bytes"]
        if full:
            row["step_time_ratio"] = row["step_time_s"] / full["step_time_s"]
            row["peak_memory_ratio"] = row["peak_memory_mb"] / full["peak_memory_mb"]
            row["latency_ratio"] = row["latency_b1_ms"] / full["latency_b1_ms"]
    return rows


def table(rows: list[dict]) -> str:
    head = (f"{'method':<12} {'trainable':>11} {'adapter':>10} {'adapter/ckpt':>12} {'step s':>8} {'x full':>7} "
            f"{'peak MB':>9} {'x full':>7} {'lat ms':>8} {'x full':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:<12} {r['trainable']:>11,} {r['adapter_bytes'] / 2**20:>8.2f}MB {r['adapter_fraction']:>11.3%} "
            f"{r['step_time_s']:>8.3f} {r.get('step_time_ratio', float('nan')):>7.2f} {r['peak_memory_mb']:>9.0f} "
            f"{r.get('peak_memory_ratio', float('nan')):>7.2f} {r['latency_b1_ms']:>8.1f} {r.get('latency_ratio', float('nan')):>7.2f}"
        )
    return "\n".join(lines)


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


def run(config: str, methods: list[str], steps: int, warmup: int, device: str) -> list[dict]:
    rows = []
    for method in methods:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", method, "--config", config, "--steps", str(steps),
             "--warmup", str(warmup), "--device", device],
            capture_output=True, text=True, check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{method} on {config} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"  measured {method}", file=sys.stderr)
    return with_ratios(rows)


def main() -> None:
    from dvpt_core.peft import METHODS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="small")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.config, args.steps, args.warmup, args.device)))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    methods = ["full", *[m for m in args.methods if m != "full"]]
    for config in CONFIGS if args.config == "all" else [args.config]:
        rows = run(config, methods, args.steps, args.warmup, args.device)
        spec = CONFIGS[config]
        title = f"{spec['backbone']} @ {spec['image_size']}, batch {spec['batch']}, {args.device}"
        print(f"\n{title}\n{table(rows)}")
        dvpt = next((r for r in rows if r["method"] == "dvpt"), None)
        if dvpt and "step_time_ratio" in dvpt:
            print(f"targets for dvpt: step {dvpt['step_time_ratio']:.2f}x (<= {TARGETS['step_time']}), "
                  f"memory {dvpt['peak_memory_ratio']:.2f}x (<= {TARGETS['peak_memory']}), "
                  f"adapter {dvpt['adapter_fraction']:.3%} (<= {TARGETS['adapter_fraction']:.1%})")
        (RESULTS / f"cost-{config}-{args.device}.json").write_text(json.dumps(rows, indent=2))
        plot(rows, RESULTS / f"cost-{config}-{args.device}.png", title)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
