"""``dvpt kfp compile | run-local | submit``: the Kubeflow side of the ``dvpt`` command.

Each subcommand takes the same configuration flags as the step subcommands (``--params``,
``--preset``, ``--set``), so one experiment definition drives DVC, local runs and Kubeflow.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from dvpt_core.config import ExperimentConfig, load_config


def _config(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.params, args.overrides, args.preset)


def cmd_compile(args: argparse.Namespace) -> dict:
    from components import default_image
    from pipelines.dvpt_pipeline import compile_pipeline

    image = args.image or default_image()
    path = compile_pipeline(args.out, _config(args), image, args.data_pvc)
    return {"package": str(path), "image": image, "data_pvc": args.data_pvc}


def cmd_run_local(args: argparse.Namespace) -> dict:
    from pipelines.dvpt_pipeline import run_local

    return run_local(_config(args), args.data, args.pipeline_root)


def cmd_submit(args: argparse.Namespace) -> dict:
    from pipelines.dvpt_pipeline import submit

    if args.package and (args.params or args.overrides or args.preset or args.image or args.data_pvc):
        raise ValueError("--package carries the configuration, image and volume it was compiled with: "
                         "drop --params/--preset/--set/--image/--data-pvc, or drop --package to compile now")
    return submit(args.package or _config(args), host=args.host, data_dir=args.data,
                  experiment=args.experiment, namespace=args.namespace, token=args.token,
                  run_name=args.run_name, image=args.image, data_pvc=args.data_pvc)


def add_kfp_commands(subparsers: argparse._SubParsersAction,
                     config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Adds ``kfp`` with its subcommands; each handler returns a dict the CLI prints as JSON."""
    kfp = subparsers.add_parser("kfp", help="compile, run locally or submit the Kubeflow pipeline")
    sub = kfp.add_subparsers(dest="kfp_command", required=True)
    image_help = "container image of every component (default: $DVPT_IMAGE, else dvpt-mlops:0.1.0)"
    pvc_help = "PersistentVolumeClaim holding the data, mounted at /mnt/data (--data then lies under it)"

    compile_ = sub.add_parser("compile", help="compile the pipeline to KFP IR YAML")
    config_args(compile_)
    compile_.add_argument("--out", type=Path, default=Path("pipeline.yaml"), help="default: pipeline.yaml")
    compile_.add_argument("--image", help=image_help)
    compile_.add_argument("--data-pvc", help=pvc_help)
    compile_.set_defaults(func=cmd_compile)

    local = sub.add_parser("run-local", help="run the pipeline here with kfp.local (no cluster, no Docker)")
    config_args(local)
    local.add_argument("--data", type=Path, required=True, help="dataset folder")
    local.add_argument("--pipeline-root", type=Path, default=Path("local_outputs"),
                       help="where task outputs go (default: local_outputs)")
    local.set_defaults(func=cmd_run_local)

    submit = sub.add_parser("submit", help="submit a run to a Kubeflow Pipelines host")
    config_args(submit)
    submit.add_argument("--host", required=True, help="KFP API address, e.g. https://kubeflow.example.com/pipeline")
    submit.add_argument("--namespace", help="Kubeflow profile namespace (multi-user deployments)")
    submit.add_argument("--experiment", default="dvpt", help="KFP experiment name (default: dvpt)")
    submit.add_argument("--token", help="bearer token (default: $KF_PIPELINES_TOKEN)")
    submit.add_argument("--data", required=True, help="dataset folder as the pipeline's pods see it")
    submit.add_argument("--package", type=Path, help="a compiled pipeline.yaml (default: compile the configuration now)")
    submit.add_argument("--run-name", help="run name shown in the KFP UI")
    submit.add_argument("--image", help=image_help + "; not with --package")
    submit.add_argument("--data-pvc", help=pvc_help + "; not with --package")
    submit.set_defaults(func=cmd_submit)
