"""Serving: the registered pyfunc behind ``mlflow models serve``, batch inference, and the
multi-adapter server, each over real HTTP on loopback with versions from a real MLflow server."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import uvicorn
from PIL import Image

from dvpt_core.peft import METHODS, build_model
from dvpt_core.peft.adapter import save_adapter
from dvpt_core.serving.pool import SHARED_BACKBONE, AdapterPool
from dvpt_core.serving.server import AdapterSpec, create_app
from dvpt_core.steps.predict import predict
from tests.helpers import tiny_config
from tests.registry_helpers import dvc_pointer, register_run, registry_runs  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]
BRIGHT, DARK = 190, 60


def _png(level: int, size: int = 40) -> bytes:
    buffer = io.BytesIO()
    pixels = np.clip(np.random.default_rng(level).normal(level, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def versions(registry_runs: dict) -> dict:  # noqa: F811
    """``serve-tests`` version 1 = the good adapter (dark/bright right), version 2 = the bad one
    (every image the other class)."""
    name = "serve-tests"
    good = register_run(registry_runs["cfg"], registry_runs["good"], name, registry_runs["export"])
    bad = register_run(registry_runs["cfg"], registry_runs["bad"], name, registry_runs["export"])
    return {"name": name, "good": good, "bad": bad, "runs": registry_runs}


# --- one backbone, many adapters ------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_shared_backbone_methods_are_exactly_those_that_leave_the_backbone_untouched(method: str) -> None:
    cfg = tiny_config(f"model.method={method}")
    model = build_model(cfg)
    from dvpt_core.models.backbone import create_backbone

    pristine, _ = create_backbone(cfg.model)
    before = [(name, type(module)) for name, module in pristine.named_modules()]
    after = [(name, type(module)) for name, module in model.backbone.named_modules()]
    trains_backbone = any(p.requires_grad for p in model.backbone.parameters())
    untouched = before == after and not trains_backbone
    assert ((method, "vit") in SHARED_BACKBONE) == untouched


@contextmanager
def serving(app) -> Iterator[str]:
    """``app`` under a real uvicorn server on a free loopback port, in a thread."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _wait_ready(url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = requests.get(f"{url}/ready", timeout=5)
        if response.status_code == 200:
            return response.json()
        assert time.monotonic() < deadline, response.text
        time.sleep(0.1)


def test_two_adapters_answer_differently_in_one_process_over_one_backbone(versions: dict, tmp_path) -> None:
    name = versions["name"]
    pool = AdapterPool(tmp_path / "cache")
    specs = {"good": AdapterSpec(uri=f"models:/{name}/{versions['good']}"),
             "bad": AdapterSpec(uri=f"models:/{name}/{versions['bad']}")}
    with serving(create_app(pool, specs)) as url:
        assert requests.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
        assert _wait_ready(url)["live"] == ["bad", "good"]
        images = [_b64(_png(BRIGHT)), _b64(_png(DARK))]
        good = requests.post(f"{url}/predict/good", json={"images": images}, timeout=30).json()
        bad = requests.post(f"{url}/predict/bad", json={"images": images}, timeout=30).json()
        assert [p["label"] for p in good["predictions"]] == ["bright", "dark"]
        assert [p["label"] for p in bad["predictions"]] == ["dark", "bright"]
        assert good["version"] == versions["good"] and bad["version"] == versions["bad"]
        listed = requests.get(f"{url}/adapters", timeout=5).json()
        assert {a["backbone_fingerprint"] for a in listed["adapters"]} == {listed["backbone"]["fingerprint"]}
        assert requests.post(f"{url}/predict/none", json={"images": images}, timeout=5).status_code == 404
        bad_input = requests.post(f"{url}/predict/good", json={"images": ["bm90IGFuIGltYWdl"]}, timeout=5)
        assert bad_input.status_code == 422 and "image 0" in bad_input.json()["detail"]
    assert pool.get("good").model.backbone is pool.get("bad").model.backbone is pool.backbone.backbone


def test_adapter_for_other_backbone_weights_is_refused_and_the_live_one_stays(versions: dict, tmp_path) -> None:
    pool = AdapterPool(tmp_path / "cache")
    stranger = save_adapter(build_model(tiny_config()), tiny_config(), tmp_path / "random-adapter")
    with serving(create_app(pool, {"x": AdapterSpec(uri=f"models:/{versions['name']}/{versions['good']}")})) as url:
        _wait_ready(url)
        response = requests.put(f"{url}/adapters/x", json={"uri": str(stranger)}, timeout=30)
        assert response.status_code == 409 and "refusing to load it over different frozen weights" in response.text
        (live,) = requests.get(f"{url}/adapters", timeout=5).json()["adapters"]
        assert live["version"] == versions["good"]


def test_swap_to_a_new_champion_under_concurrent_requests_loses_none(versions: dict, tmp_path) -> None:
    name, client = versions["name"], mlflow.MlflowClient()
    client.set_registered_model_alias(name, "serving", versions["bad"])
    pool = AdapterPool(tmp_path / "cache")
    app = create_app(pool, {"live": AdapterSpec(uri=f"models:/{name}@serving")}, watch_s=0.2)
    image = _b64(_png(BRIGHT))
    results: list[tuple[int, str, str]] = []
    stop = threading.Event()

    def client_loop(url: str) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                r = session.post(f"{url}/predict/live", json={"images": [image]}, timeout=30)
                body = r.json()
                results.append((r.status_code, body.get("version", ""), body["predictions"][0]["label"]
                                if r.ok else r.text))

    with serving(app) as url:
        _wait_ready(url)
        threads = [threading.Thread(target=client_loop, args=(url,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        client.set_registered_model_alias(name, "serving", versions["good"])  # the new champion
        deadline = time.monotonic() + 30
        while pool.get("live").source.version != versions["good"]:
            assert time.monotonic() < deadline, "the watcher did not swap the adapter in"
            time.sleep(0.05)
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join()

    assert results and all(status == 200 for status, _, _ in results), [r for r in results if r[0] != 200][:3]
    answers = {(version, label) for _, version, label in results}
    # Each response comes whole from one version: the bad one says dark, the good one bright.
    assert answers == {(versions["bad"], "dark"), (versions["good"], "bright")}
    seen = [version for _, version, _ in results]
    assert seen.index(versions["good"]) > 0 and versions["bad"] not in seen[seen.index(versions["good"]) + 8:]
    assert pool.get("live").swap_ms < 5000


# --- batch inference ------------------------------------------------------------------------------


def test_batch_predict_reports_a_corrupt_file_and_predicts_the_rest(versions: dict, tmp_path) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / f"bright_{i}.png").write_bytes(_png(BRIGHT + i))
        (folder / "sub" / f"dark_{i}.png").write_bytes(_png(DARK + i))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "notes.txt").write_text("not an image, not an input")
    dvc_pointer(folder, "0123456789abcdef0123456789abcdef.dir")  # a DVC-tracked folder
    uri = f"models:/{versions['name']}/{versions['good']}"

    summary = predict(uri, folder, tmp_path / "out")
    assert summary["data_dvc_md5"] == "0123456789abcdef0123456789abcdef.dir"
    assert (summary["images"], summary["predicted"], summary["failed"]) == (7, 6, 1)
    assert summary["failures"][0]["file"] == "broken.png" and "not a readable image" in summary["failures"][0]["error"]
    table = pd.read_csv(tmp_path / "out/predictions.csv", keep_default_na=False)
    ok = table[table["status"] == "ok"]
    assert set(ok["label"]) == {"bright", "dark"}
    names = ok["file"].str.split("/").str[-1]
    assert all(ok["label"] == ["bright" if f.startswith("bright") else "dark" for f in names])
    np.testing.assert_allclose(ok["p_dark"].astype(float) + ok["p_bright"].astype(float), 1.0, rtol=1e-9)
    assert json.loads((tmp_path / "out/summary.json").read_text())["version"] == versions["good"]

    # The same images through ONNX Runtime agree; a CSV may name a missing file.
    (tmp_path / "list.csv").write_text("image\nimages/bright_0.png\nimages/missing.png\nimages/sub/dark_1.png\n")
    onnx = predict(uri, tmp_path / "list.csv", tmp_path / "onnx", runtime="onnx")
    assert (onnx["predicted"], onnx["failed"]) == (2, 1) and "missing.png" in onnx["failures"][0]["file"]
    onnx_table = pd.read_csv(tmp_path / "onnx/predictions.csv", keep_default_na=False).set_index("file")
    torch_table = table.set_index("file")
    for file in ("bright_0.png", "sub/dark_1.png"):
        assert onnx_table.loc[f"images/{file}", "label"] == torch_table.loc[file, "label"]
        assert float(onnx_table.loc[f"images/{file}", "p_bright"]) == pytest.approx(
            float(torch_table.loc[file, "p_bright"]), abs=1e-4)


@pytest.mark.slow
def test_batch_inference_pipeline_runs_locally(versions: dict, tmp_path) -> None:
    from pipelines.predict_pipeline import run_predict_local

    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a_bright.png").write_bytes(_png(BRIGHT))
    (folder / "b_dark.png").write_bytes(_png(DARK))
    (folder / "c_broken.png").write_bytes(b"not a png")
    summary = run_predict_local(versions["runs"]["cfg"], folder, tmp_path / "kfp",
                                model_uri=f"models:/{versions['name']}/{versions['good']}")
    assert (summary["predicted"], summary["failed"], summary["version"]) == (2, 1, versions["good"])
    table = pd.read_csv(summary["predictions"], keep_default_na=False)
    assert table["label"].tolist() == ["bright", "dark", ""]


# --- the registered pyfunc behind mlflow models serve ---------------------------------------------


def test_mlflow_models_serve_answers_the_documented_request(versions: dict, mlflow_server: str, tmp_path) -> None:
    name, version = versions["name"], versions["good"]
    local = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    example = json.loads(Path(mlflow.artifacts.download_artifacts(
        f"models:/{name}/{version}/serving_input_example.json", dst_path=str(tmp_path))).read_text())
    assert len(json.dumps(example)) < 20_000  # a small realistic example, not an array of zeros

    port = _free_port()
    # mlflow execs `uvicorn` by name: the environment's own bin must be on PATH, as `make test` puts it.
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}/{version}", "--env-manager",
         "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not start"
            time.sleep(0.5)
        request = {"dataframe_records": [{"image": _b64(_png(BRIGHT))}, {"image": _b64(_png(DARK))}]}
        response = requests.post(f"{url}/invocations", json=request, timeout=60)
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert [p["label"] for p in predictions] == ["bright", "dark"]
        assert set(predictions[0]["probabilities"]) == {"dark", "bright"}
        # The documented example request is answered too, as the model answers it in process.
        served = requests.post(f"{url}/invocations", json=example, timeout=60).json()["predictions"]
        expected = local.predict(pd.DataFrame(example["dataframe_split"]["data"],
                                              columns=example["dataframe_split"]["columns"]))
        assert served[0]["label"] == expected["label"][0]
        assert served[0]["probabilities"] == pytest.approx(expected["probabilities"][0], abs=1e-6)
        garbage = requests.post(f"{url}/invocations", json={"dataframe_records": [{"image": "AAAA"}]}, timeout=30)
        assert garbage.status_code >= 400 and "not a readable image" in garbage.text
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
