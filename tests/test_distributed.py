"""Data-parallel training under torchrun, for real: two CPU processes (gloo) started by
``python -m torch.distributed.run`` train what one process trains with the same global batch,
only rank 0 talks to MLflow and writes files, a dead process stops the job instead of hanging it
with no MLflow run left RUNNING, and the job resumes on both processes from rank 0's checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dvpt_core.checkpoint import CHECKPOINT_FILE
from dvpt_core.config import ConfigError
from dvpt_core.data.dataset import make_loader, set_epoch
from dvpt_core.distributed import process_group
from dvpt_core.steps.sync import HISTORY_FILE, read_sync_state
from dvpt_core.steps.train import train
from tests.helpers import TINY, params_tree, prepared_dataset, tiny_config

PROCESSES = 2
# 15 training images in global batches of 6: 6, 6 and 3, the last one split 2 + 1 and padded by
# the sampler, so the gathered loss must drop the padding to be one process's. Augmentation stays
# on (flips, crops): it is seeded per sample, not per process.
RUN = [*TINY, "synthetic.train=15", "train.batch_size=6", "train.epochs=4", "train.warmup_epochs=1",
       "train.process_group_timeout_s=60"]
# Rounding only: the processes multiply smaller batches and sum gradients in another order. A
# wrong gradient or batch would move a tensor by about one step of the learning rate (1e-3).
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return prepared_dataset(tiny_config(*RUN), tmp_path_factory.mktemp("distributed"))


def _torchrun(params: Path, prepared: dict[str, Path], out: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={PROCESSES}",
            "-m", "dvpt_core.cli", "train", "--params", str(params), "--cache", str(prepared["cache"]),
            "--data", str(prepared["data"]), "--out", str(out)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _descendants(pid: int) -> list[int]:
    children = [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
                for child in (task / "children").read_text().split()]
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _worker(agent: int, rank: int) -> int:
    """The process torchrun (``agent``) started as ``rank`` (by its environment)."""
    for pid in _descendants(agent):
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
        except OSError:
            continue
    raise AssertionError(f"torchrun {agent} has no process of rank {rank}")


def _kill_one_process_after_an_epoch(command: list[str], out: Path) -> tuple[int, float, str]:
    """Start the job, SIGKILL rank 1 once rank 0 has checkpointed an epoch; the job's exit code,
    how long it took to end after the kill, and its log."""
    log = out.parent / "killed.log"
    with log.open("w") as stderr:
        agent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=_env())
        deadline = time.monotonic() + 300
        while not (out / CHECKPOINT_FILE).is_file():
            assert agent.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not progress"
            time.sleep(0.02)
        os.kill(_worker(agent.pid, 1), signal.SIGKILL)
        killed = time.monotonic()
        agent.wait(timeout=120)
    return agent.returncode, time.monotonic() - killed, log.read_text()


@pytest.mark.slow
def test_two_processes_train_what_one_does_and_resume_together(prepared, tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    one = tmp_path / "one"
    train(tiny_config(*RUN, f"tracking.tracking_uri={uri}", "tracking.experiment=one"), prepared["cache"], one)

    two = tmp_path / "two"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(params_tree([*RUN, f"tracking.tracking_uri={uri}", "tracking.experiment=two"])))
    command = _torchrun(params, prepared, two)
    code, waited, log = _kill_one_process_after_an_epoch(command, two)

    # A dead process ends the job (well within the process group's 60 s timeout), and rank 0
    # closed its run on the way out; the checkpoint stays for the next attempt.
    assert code != 0 and waited < 60, log[-3000:]
    client = mlflow.MlflowClient(uri)
    run_id = read_sync_state(two)["run_id"]
    assert client.get_run(run_id).info.status in {"FAILED", "KILLED"}
    assert (two / CHECKPOINT_FILE).is_file() and not (two / "active.json").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # The loss curve, the validation scores and the adapter are one process's, up to rounding.
    expected, got = pd.read_csv(one / HISTORY_FILE), pd.read_csv(two / HISTORY_FILE)
    assert list(got["epoch"]) == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(got, expected, check_exact=False, rtol=RTOL, atol=1e-7)
    reference, adapter = load_file(str(one / "adapter/adapter.safetensors")), load_file(str(two / "adapter/adapter.safetensors"))
    assert adapter.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(adapter[name], tensor, rtol=RTOL, atol=ATOL, msg=name)

    # Rank 0 alone: one MLflow run (resumed, finished, every epoch logged once), one adapter.
    runs = client.search_runs([client.get_experiment_by_name("two").experiment_id])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2, 3, 4]
    assert [p.relative_to(two) for p in two.rglob("*.safetensors")] == [Path("adapter/adapter.safetensors")]
    assert not (two / CHECKPOINT_FILE).exists() and not (two / "active.json").exists()


def test_the_processes_shares_of_a_batch_are_one_process_batch_augmented_alike(prepared) -> None:
    """Process r's j-th sample of a step is sample ``j * 2 + r`` of one process's batch, image
    (augmented) and label; the epoch's last batch of 3 comes as 2 + 1 plus the sampler's padding."""
    cfg = tiny_config(*RUN)
    mean, std = (0.5,) * 3, (0.25,) * 3
    one = make_loader(prepared["cache"] / "train", mean, std, True, cfg)
    shares = [make_loader(prepared["cache"] / "train", mean, std, True, cfg, world_size=2, rank=r) for r in (0, 1)]
    for loader in (one, *shares):
        set_epoch(loader, 1)
    steps = list(zip(one, *shares, strict=True))
    assert [len(batch[1]) for batch, _, _ in steps] == [6, 6, 3]
    for (images, labels), *parts in steps:
        for position in range(len(labels)):
            share_images, share_labels = parts[position % 2]
            assert torch.equal(share_images[position // 2], images[position])
            assert share_labels[position // 2] == labels[position]
    set_epoch(one, 0)
    assert not torch.equal(next(iter(one))[0], steps[0][0][0]), "each epoch is ordered and augmented anew"


def test_a_global_batch_the_processes_cannot_share_evenly_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match=r"train\.batch_size=6 is the global batch .* 4 training processes"):
        with process_group(tiny_config("train.batch_size=6", "train.device=cpu").train):
            pass
    assert not torch.distributed.is_initialized()
