"""Fault injection for training, tracking and registration, done for real: processes killed with
SIGKILL and SIGTERM at several points and resumed, a real MLflow server stopped during training,
a registration failing half-way. After every fault nothing is lost, nothing is half-written and
no MLflow run is left RUNNING; a resumed run ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dvpt_core.checkpoint import CHECKPOINT_FILE
from dvpt_core.steps.register import RegistrationError, register
from dvpt_core.steps.sync import read_sync_state
from tests.conftest import LocalMlflowServer
from tests.helpers import TINY, params_tree, prepared_dataset, tiny_config

# Fault injection runs the real CLI in subprocesses, against a real MLflow server: the slow tier.
pytestmark = pytest.mark.slow

EPOCHS = 4
RUN = [*TINY, f"train.epochs={EPOCHS}", "train.warmup_epochs=1", "synthetic.train=32"]


def _params(path: Path, uri: str, *extra: str) -> Path:
    path.write_text(yaml.safe_dump(params_tree(
        [*RUN, f"tracking.tracking_uri={uri}", "tracking.request_timeout_s=2", "tracking.sync_wait_s=3", *extra])))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return prepared_dataset(tiny_config(*RUN), tmp_path_factory.mktemp("faults"))


def _train_command(params: Path, prepared: dict[str, Path], out: Path) -> list[str]:
    return [sys.executable, "-m", "dvpt_core.cli", "train", "--params", str(params), "--cache", str(prepared["cache"]),
            "--data", str(prepared["data"]), "--validation", str(prepared["validation"]), "--out", str(out)]


def _env() -> dict[str, str]:
    # One thread: the same arithmetic in every process, so resumed and uninterrupted runs can be
    # compared bit for bit.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=timeout)


def _epochs_done(out: Path) -> int:
    return read_sync_state(out).get("epochs_logged", 0) if (out / "sync.json").is_file() else 0


def _start_and_stop(command: list[str], out: Path, after_epochs: int, sig: signal.Signals) -> tuple[int, str]:
    """Start training, send ``sig`` once ``after_epochs`` epochs are checkpointed and logged (0: as
    soon as the MLflow run exists, i.e. within the first epoch); returns the exit code and stderr.

    The process is held (SIGSTOP) where the poll found it before the signal is chosen: on a loaded
    machine the poll can wake up an epoch late, and a run that already went past ``after_epochs``
    is let finish, discarded and started again, so the signal always lands where the test says."""
    log = out.parent / f"stopped-{sig.name}.log"
    for _ in range(5):
        with log.open("w") as stderr:
            # SIGINT as a terminal delivers it: a shell starts background jobs (CI scripts) with
            # SIGINT ignored, and a Python started so never raises KeyboardInterrupt.
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=_env(),
                                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            deadline = time.monotonic() + 300
            while (not (out / "active.json").is_file()) or _epochs_done(out) < after_epochs:
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "training did not progress"
                time.sleep(0.05)
            process.send_signal(signal.SIGSTOP)
            if _epochs_done(out) == after_epochs and not (out / "run.json").exists():
                process.send_signal(sig)
                process.send_signal(signal.SIGCONT)
                process.wait(timeout=120)
                return process.returncode, log.read_text()
            process.send_signal(signal.SIGCONT)
            process.wait(timeout=120)
        shutil.rmtree(out)
    raise AssertionError(f"training always went past {after_epochs} epochs before the signal could be sent")


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter.safetensors"))


def _same_result(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (a / "history.csv").read_text() == (b / "history.csv").read_text()


@pytest.fixture(scope="module")
def uninterrupted(prepared, mlflow_server, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    out = root / "train"
    done = _run(_train_command(_params(root / "params.yaml", mlflow_server), prepared, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _statuses(uri: str, out: Path) -> dict[str, str]:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("dvpt")
    return {r.info.run_id: r.info.status for r in client.search_runs([experiment.experiment_id])}


@pytest.mark.parametrize(("sig", "after_epochs"), [(signal.SIGKILL, 0), (signal.SIGKILL, 2), (signal.SIGTERM, 1),
                                                   (signal.SIGINT, 3)])
def test_killed_training_resumes_to_exactly_the_uninterrupted_result(
        prepared, mlflow_server, uninterrupted, tmp_path, sig, after_epochs) -> None:
    out = tmp_path / "train"
    params = _params(tmp_path / "params.yaml", mlflow_server)
    command = _train_command(params, prepared, out)
    code, stderr = _start_and_stop(command, out, after_epochs, sig)
    assert code != 0
    first_run = json.loads((out / "active.json").read_text())["run_id"] if (out / "active.json").is_file() else None
    if sig != signal.SIGKILL:
        # Closed on the way out: KILLED, resumable, and the CLI said how to resume.
        assert mlflow.MlflowClient(mlflow_server).get_run(read_sync_state(out)["run_id"]).info.status == "KILLED"
        assert (out / CHECKPOINT_FILE).is_file() and "resume" in stderr
        assert stderr.strip().splitlines()[-1].startswith("dvpt train: interrupted") and "Traceback" not in stderr
    resumed = _run(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_result(out, uninterrupted)
    summary = json.loads((out / "run.json").read_text())
    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and summary["synced"] is True
    assert [m.step for m in client.get_metric_history(summary["run_id"], "val_kappa")] == list(range(1, EPOCHS + 1))
    if after_epochs > 0:
        # The checkpoint carried the run: the same MLflow run went on.
        assert summary["run_id"] == read_sync_state(out)["run_id"]
    if first_run and first_run != summary["run_id"]:
        assert client.get_run(first_run).info.status == "KILLED"
    assert not (out / CHECKPOINT_FILE).exists() and not (out / "active.json").exists()
    assert "RUNNING" not in {client.get_run(r).info.status for r in {summary["run_id"], first_run} if r}


def test_lost_server_keeps_the_training_and_sync_completes_the_run(prepared, tmp_path) -> None:
    server = LocalMlflowServer(tmp_path / "server").start()
    out = tmp_path / "train"
    params = _params(tmp_path / "params.yaml", server.uri)
    process = subprocess.Popen(_train_command(params, prepared, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=_env())
    try:
        deadline = time.monotonic() + 300
        while _epochs_done(out) < 1:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        server.stop()
        started = time.monotonic()
        _, stderr = process.communicate(timeout=300)
        waited = time.monotonic() - started
    finally:
        server.stop()
    assert process.returncode == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("dvpt train: error: training finished") and "dvpt sync" in last and "Traceback" not in stderr
    assert waited < 120
    assert (out / "adapter" / "adapter.safetensors").is_file() and (out / "history.csv").is_file()
    run_id = read_sync_state(out)["run_id"]

    server.start()
    try:
        synced = _run([sys.executable, "-m", "dvpt_core.cli", "sync", "--params", str(params), "--train", str(out)])
        assert synced.returncode == 0, synced.stderr[-3000:]
        client = mlflow.MlflowClient(server.uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "val_kappa")] == list(range(1, EPOCHS + 1))
        summary = json.loads((out / "run.json").read_text())
        assert summary["synced"] and client.get_logged_model(summary["model_id"]).source_run_id == run_id
    finally:
        server.stop()


def test_an_unreachable_server_fails_in_seconds_with_one_masked_line(prepared, tmp_path) -> None:
    params = _params(tmp_path / "params.yaml", "http://alice:s3cret@127.0.0.1:9")
    started = time.monotonic()
    done = _run(_train_command(params, prepared, tmp_path / "train"), timeout=120)
    assert done.returncode == 2 and time.monotonic() - started < 60
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("dvpt train: error: the MLflow tracking server at http://alice:***@127.0.0.1:9")
    assert "s3cret" not in done.stderr + done.stdout and "Traceback" not in done.stderr


# --- registration -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(prepared, mlflow_server, tmp_path_factory) -> tuple[Path, Path]:
    from dvpt_core.steps.export import export
    from dvpt_core.steps.train import train

    root = tmp_path_factory.mktemp("registered")
    cfg = tiny_config(*RUN, f"tracking.tracking_uri={mlflow_server}", "train.epochs=1")
    train(cfg, prepared["cache"], root / "train", data_root=prepared["data"])
    export(cfg, prepared["cache"], root / "train", root / "export")
    return root / "train", root / "export"


def test_registering_a_run_twice_returns_its_version(trained, mlflow_server, tmp_path) -> None:
    cfg = tiny_config(*RUN, f"tracking.tracking_uri={mlflow_server}", "tracking.registered_model=faults-twice")
    first = register(cfg, *trained, tmp_path / "a")
    again = register(cfg, *trained, tmp_path / "b")
    assert again["version"] == first["version"]
    versions = mlflow.MlflowClient(mlflow_server).search_model_versions("name='faults-twice'")
    assert len(versions) == 1 and versions[0].tags["random_weights"] == "true"
    assert versions[0].description and "RANDOM WEIGHTS" in versions[0].description


def test_a_bad_alias_is_refused_before_any_version_exists(trained, mlflow_server, tmp_path) -> None:
    cfg = tiny_config(*RUN, f"tracking.tracking_uri={mlflow_server}", "tracking.registered_model=faults-alias",
                      "tracking.alias=v3")
    with pytest.raises(RegistrationError, match="alias 'v3'"):
        register(cfg, *trained, tmp_path / "out")
    assert not mlflow.MlflowClient(mlflow_server).search_model_versions("name='faults-alias'")
    assert not (tmp_path / "out" / "registered.json").exists()


def test_registration_failing_half_way_leaves_no_unlabelled_version(trained, mlflow_server, tmp_path,
                                                                     monkeypatch) -> None:
    cfg = tiny_config(*RUN, f"tracking.tracking_uri={mlflow_server}", "tracking.registered_model=faults-half")

    def lost(*args: object, **kwargs: object) -> None:
        raise mlflow.MlflowException("connection lost while setting the alias")

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", lost)
    with pytest.raises(RegistrationError, match="connection lost"):
        register(cfg, *trained, tmp_path / "out")
    monkeypatch.undo()
    client = mlflow.MlflowClient(mlflow_server)
    assert not [v for v in client.search_model_versions("name='faults-half'") if v.status == "READY"]
    assert not (tmp_path / "out" / "registered.json").exists()
    done = register(cfg, *trained, tmp_path / "out")
    assert client.get_model_version_by_alias("faults-half", "challenger").version == done["version"]
