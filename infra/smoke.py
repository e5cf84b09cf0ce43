"""The image's check: everything imports and ``dvpt summary`` builds a model.

Imports every module of the project's packages and every installed package the project requires,
then runs ``dvpt summary`` through the ``dvpt`` entry point on a small random ViT. With a variant
(``--variant``, default ``$DVPT_IMAGE_VARIANT``, which infra/Dockerfile sets) it also checks that
the image is the variant it claims: ``cpu`` has no CUDA build of torch, no NVIDIA wheels and the
CPU onnxruntime; ``gpu`` has onnxruntime-gpu with its CUDA provider and never the CPU wheel.

The image's default command and the last step of its build (a broken image fails to build):
    docker run --rm REGISTRY/dvpt-mlops:0.1.0
Prints one JSON object and exits 0, or names what failed and exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata as metadata
import io
import json
import logging
import os
import pkgutil
import re
import sys

from packaging.requirements import Requirement

log = logging.getLogger("dvpt.smoke")

DISTRIBUTION = "dvpt-mlops"
PACKAGES = ("dvpt_core", "components", "pipelines")
VARIANT_ENV = "DVPT_IMAGE_VARIANT"
VARIANTS = ("cpu", "gpu")
SUMMARY_ARGS = ["summary", "--backbone", "vit_tiny_patch16_224", "--num-classes", "2", "--json"]


class SmokeError(RuntimeError):
    """The image is not what it should be; the message says what is missing or wrong."""


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def required_modules(distribution: str = DISTRIBUTION) -> list[str]:
    """Top-level modules of the distribution's installed requirements.

    Read from the installed metadata, so the list follows pyproject.toml with nothing to keep in
    step. A requirement without a marker must be installed; an extra's (onnxruntime or
    onnxruntime-gpu, the test tools) is imported only where the image installed it.
    """
    modules_of: dict[str, set[str]] = {}
    for module, owners in metadata.packages_distributions().items():
        if not module.startswith("_"):
            for owner in owners:
                modules_of.setdefault(_normalise(owner), set()).add(module)
    modules: set[str] = set()
    missing: list[str] = []
    for line in metadata.requires(distribution) or []:
        requirement = Requirement(line)
        if _installed(requirement.name):
            modules |= modules_of.get(_normalise(requirement.name), set())
        elif requirement.marker is None:
            missing.append(str(requirement))
    if missing:
        raise SmokeError(f"{distribution} requires {', '.join(missing)}: not installed")
    return sorted(modules)


def project_modules(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Every module of the project's packages, found by walking them as installed."""
    names: list[str] = []
    for top in packages:
        package = importlib.import_module(top)
        names.append(top)
        names += [info.name for info in pkgutil.walk_packages(package.__path__, f"{top}.")]
    return names


def import_all(names: list[str]) -> None:
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001  (collect every failure, report them together)
            failed.append(f"{name}: {type(err).__name__}: {err}")
    if failed:
        raise SmokeError("imports failed:\n  " + "\n  ".join(failed))


def variant_problems(variant: str) -> list[str]:
    """What contradicts ``variant`` in this environment; empty when the image is that variant."""
    if variant not in VARIANTS:
        raise SmokeError(f"{VARIANT_ENV}={variant!r}: expected one of {', '.join(VARIANTS)}")
    import torch

    runtimes = sorted(d for d in ("onnxruntime", "onnxruntime-gpu") if _installed(d))
    problems: list[str] = []
    if variant == "cpu":
        if torch.version.cuda:
            problems.append(f"torch {torch.__version__} is a CUDA {torch.version.cuda} build")
        nvidia = sorted(d.metadata["Name"] for d in metadata.distributions()
                        if _normalise(d.metadata["Name"]).startswith("nvidia-"))
        if nvidia:
            problems.append(f"CUDA wheels installed: {', '.join(nvidia)}")
        if runtimes != ["onnxruntime"]:
            problems.append(f"ONNX runtimes {runtimes}: expected only onnxruntime")
    else:
        if runtimes != ["onnxruntime-gpu"]:
            problems.append(f"ONNX runtimes {runtimes}: expected only onnxruntime-gpu")
        else:
            import onnxruntime

            providers = onnxruntime.get_available_providers()
            if "CUDAExecutionProvider" not in providers:
                problems.append(f"onnxruntime-gpu without CUDAExecutionProvider: {providers}")
    return problems


def run_summary() -> dict:
    """``dvpt summary`` through the installed ``dvpt`` entry point, in this process."""
    (entry,) = metadata.entry_points(group="console_scripts", name="dvpt")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = entry.load()(SUMMARY_ARGS)
    if status != 0:
        raise SmokeError(f"dvpt {' '.join(SUMMARY_ARGS)} exited with {status}")
    summary = json.loads(out.getvalue())
    if not 0 < summary["trainable"] < summary["total"]:
        raise SmokeError(f"dvpt summary: trainable {summary['trainable']} of {summary['total']} parameters")
    return summary


def smoke(variant: str | None) -> dict:
    modules = project_modules()
    import_all(modules)
    requirements = required_modules()
    import_all(requirements)
    if variant:
        problems = variant_problems(variant)
        if problems:
            raise SmokeError(f"not the {variant} variant: " + "; ".join(problems))
    summary = run_summary()
    return {"variant": variant, "project_modules": len(modules), "required_modules": requirements,
            "summary": {k: summary[k] for k in ("backbone", "method", "trainable", "total")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, default=os.environ.get(VARIANT_ENV) or None,
                        help=f"check the image variant too (default: ${VARIANT_ENV})")
    args = parser.parse_args(argv)
    # WARNING: the stack's import-time INFO chatter would bury the result.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        result = smoke(args.variant)
    except SmokeError as err:
        log.error("%s", err)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
