"""Serving benchmark: one frozen backbone with many hot-swapped adapters, side by side in one run.

Measures, for DVPT adapters on a ViT (default: the paper's CLIP ViT-B/16 at 224 px, m=50, d'=20,
s=1, random weights since none can be downloaded here; the timings do not depend on the values):

1. hot-swap time: building an adapter's model over the loaded backbone, verifying it against the
   backbone's fingerprint and making it live (``AdapterPool.swap_in``), median and p95 over swaps;
2. memory of N adapters on one backbone against N whole models: unique tensor bytes in one
   process, and each setting's resident memory above the libraries' own, each measured in a
   fresh process;
3. latency (p50, p95) and throughput at batch 1 for PyTorch eager (the shared backbone) against
   ONNX Runtime (the adapter's exported graph), both served by one ``dvpt serve`` process on
   loopback and driven by a bounded asyncio + aiohttp load generator: a fixed number of requests
   per block at a fixed concurrency, the two runtimes' blocks interleaved so they see the same
   machine load.

    python benchmarks/serving.py --out benchmarks/results/serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dvpt_core.config import load_config  # noqa: E402
from dvpt_core.peft import METHODS  # noqa: E402
from dvpt_core.peft.adapter import save_adapter  # noqa: E402
from dvpt_core.serving.pool import AdapterPool, SharedBackbone  # noqa: E402
from dvpt_core.serving.sources import LOCAL_ONNX, ModelSource  # noqa: E402
from dvpt_core.steps.export import export_onnx  # noqa: E402

PARTS = ("swap", "memory", "latency")
VIT_B = ["model.backbone=vit_base_patch16_clip_quickgelu_224.openai", "model.weights=random", "model.image_size=224"]


def make_adapters(overrides: list[str], n: int, out: Path, export: bool) -> list[Path]:
    """``n`` DVPT adapters (differently seeded) over one random backbone; the first also exported
    to ONNX (``model.onnx`` in its folder) when ``export``."""
    cfg = load_config(None, overrides)
    dirs = [out / f"adapter-{i}" for i in range(n)]
    first = save_adapter(_model(cfg, 0, None), cfg, dirs[0])
    shared = SharedBackbone(ModelSource(uri=str(first), adapter_dir=first))
    for i, path in enumerate(dirs[1:], start=1):
        save_adapter(_model(cfg, i, shared), cfg, path)
    if export:
        example = torch.randn(1, 3, cfg.model.image_size, cfg.model.image_size)
        export_onnx(shared.attach(first), example, first / LOCAL_ONNX, cfg.export.opset)
    return dirs


def _model(cfg, seed: int, shared: SharedBackbone | None):
    from dvpt_core.peft import build_model

    torch.manual_seed(seed)
    if shared is None:
        return build_model(cfg)
    return METHODS[cfg.model.method][shared.arch](shared.backbone, shared.info, cfg.model, cfg.data.num_classes)


def swap_times(dirs: list[Path], rounds: int) -> dict:
    """Milliseconds per swap onto a loaded backbone (the first load, which builds it, excluded):
    wall time, and this process's CPU time (what a swap costs where it has a core to itself; on
    a shared machine the wall time also counts the waits for one)."""
    pool = AdapterPool(Path(tempfile.mkdtemp()))
    started = time.perf_counter()
    pool.swap_in("live", ModelSource(uri=str(dirs[0]), adapter_dir=dirs[0]))
    first_ms = (time.perf_counter() - started) * 1000
    wall, cpu = [], []
    for _, adapter_dir in zip(range(rounds), _cycle(dirs[1:])):
        cpu_started = time.process_time()
        wall.append(pool.swap_in("live", ModelSource(uri=str(adapter_dir), adapter_dir=adapter_dir)).swap_ms)
        cpu.append((time.process_time() - cpu_started) * 1000)
    return {"first_load_ms": first_ms, "swap_ms_median": statistics.median(wall),
            "swap_ms_p95": float(np.percentile(wall, 95)), "swap_cpu_ms_median": statistics.median(cpu),
            "swaps": len(wall), "adapter_bytes": (dirs[0] / "adapter.safetensors").stat().st_size}


def _cycle(items: list[Path]):
    while True:
        yield from items


def unique_tensor_bytes(models: list[torch.nn.Module]) -> int:
    """Bytes of every distinct tensor storage the models hold (shared storage counted once)."""
    seen: dict[int, int] = {}
    for model in models:
        for tensor in [*model.parameters(), *model.buffers()]:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def memory_probe(setting: str, n: int, dirs: list[Path]) -> dict:
    """Run in a fresh process: resident memory with ``n`` adapters shared or ``n`` whole models."""
    from dvpt_core.peft.adapter import load_adapter

    gc.collect()
    base = _rss()
    if setting == "shared":
        pool = AdapterPool(Path(tempfile.mkdtemp()))
        for i in range(n):
            pool.swap_in(f"a{i}", ModelSource(uri=str(dirs[i]), adapter_dir=dirs[i]))
        models = [a.model for a in pool.live()]
    else:
        models = [load_adapter(dirs[i]) for i in range(n)]
    gc.collect()
    return {"setting": setting, "n": n, "rss_bytes": _rss() - base, "tensor_bytes": unique_tensor_bytes(models)}


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_memory(dirs: list[Path], n: int) -> dict:
    results = {}
    for setting, count in (("whole", 1), ("shared", n), ("whole", n)):
        out = subprocess.run([sys.executable, __file__, "_memory", setting, str(count), *map(str, dirs)],
                             capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        results[f"{setting}_{count}"] = json.loads(out.stdout.strip().splitlines()[-1])
    one = results["whole_1"]
    for key in (f"shared_{n}", f"whole_{n}"):
        results[key]["rss_ratio_to_one_model"] = results[key]["rss_bytes"] / one["rss_bytes"]
        results[key]["tensor_ratio_to_one_model"] = results[key]["tensor_bytes"] / one["tensor_bytes"]
    return results


def _png(size: int) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def _load_block(url: str, body: dict, requests: int, concurrency: int) -> dict:
    """``requests`` POSTs at most ``concurrency`` at a time; latencies in ms and throughput."""
    import aiohttp

    latencies: list[float] = []
    failures = 0
    queue = iter(range(requests))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        for _ in queue:
            started = time.perf_counter()
            async with session.post(url, json=body) as response:
                await response.read()
                failures += response.status != 200
            latencies.append((time.perf_counter() - started) * 1000)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {"latencies": latencies, "wall_s": wall, "failures": failures}


def measure_latency(dirs: list[Path], size: int, requests: int, concurrencies: list[int], blocks: int,
                    threads: int) -> dict:
    port = _free_port()
    log = open(Path(tempfile.mkdtemp()) / "serve.log", "w")  # noqa: SIM115  (closed below)
    server = subprocess.Popen(
        [sys.executable, "-m", "dvpt_core.cli", "serve", "--adapter", f"torch={dirs[0]}", "--onnx-adapter",
         f"onnx={dirs[0]}", "--port", str(port), "--cache-dir", tempfile.mkdtemp(), "--threads", str(threads)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, server)
        body = {"images": [_png(size)]}
        results: dict = {}
        for concurrency in concurrencies:
            for runtime in ("torch", "onnx"):  # warm-up
                asyncio.run(_load_block(f"{url}/predict/{runtime}", body, 2 * concurrency, concurrency))
            per_runtime: dict[str, list] = {"torch": [], "onnx": []}
            walls = {"torch": 0.0, "onnx": 0.0}
            for _ in range(blocks):
                for runtime in ("torch", "onnx"):
                    block = asyncio.run(_load_block(f"{url}/predict/{runtime}", body, requests // blocks, concurrency))
                    assert block["failures"] == 0, f"{block['failures']} failed requests"
                    per_runtime[runtime] += block["latencies"]
                    walls[runtime] += block["wall_s"]
            stats = {rt: {"p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
                          "throughput_rps": len(lat) / walls[rt], "requests": len(lat)}
                     for rt, lat in per_runtime.items()}
            stats["ort_speedup_p50"] = stats["torch"]["p50_ms"] / stats["onnx"]["p50_ms"]
            stats["ort_speedup_throughput"] = stats["onnx"]["throughput_rps"] / stats["torch"]["throughput_rps"]
            results[f"concurrency_{concurrency}"] = stats
        return results
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"dvpt serve exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError("dvpt serve did not become ready")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="model settings on top of ViT-B/16 CLIP at 224 with DVPT (paper defaults)")
    parser.add_argument("--adapters", type=int, default=10, help="N, adapters sharing the backbone (default 10)")
    parser.add_argument("--swaps", type=int, default=30)
    parser.add_argument("--requests", type=int, default=120, help="requests per runtime and concurrency")
    parser.add_argument("--blocks", type=int, default=4, help="interleaved blocks the requests are split into")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads per inference in the server, both runtimes (default: all cores)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    overrides = [*VIT_B, *args.overrides]
    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(overrides, args.adapters, Path(tmp), export="latency" in args.parts)
        result = {"backbone": cfg.model.backbone, "method": cfg.model.method, "image_size": cfg.model.image_size,
                  "threads": args.threads, "cpus": os.cpu_count(), "load_average_before": os.getloadavg()}
        if "swap" in args.parts:
            result["swap"] = swap_times(dirs, args.swaps)
        if "memory" in args.parts:
            result["memory"] = measure_memory(dirs, args.adapters)
        if "latency" in args.parts:
            result["latency"] = measure_latency(dirs, cfg.model.image_size, args.requests, args.concurrency,
                                                args.blocks, args.threads)
        result["load_average_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_memory":
        setting, count, *paths = sys.argv[2:]
        print(json.dumps(memory_probe(setting, int(count), [Path(p) for p in paths])))
    else:
        main()
