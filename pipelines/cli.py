"""``dvpt kfp compile | run-local | submit | compile-compare | compare-local``: the Kubeflow side
of the ``dvpt`` command.

Each subcommand takes the same configuration flags as the step subcommands (``--params``,
``--preset``, ``--set``), so one experiment definition drives DVC, local runs and Kubeflow. The
comparison subcommands add the grid (``--methods``, ``--seeds``, ``--label-ratios`` and per-method
``--method-set METHOD:KEY=VALUE``); a compiled comparison is submitted with ``submit --package``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from dvpt_core.cli import config_from_args
from dvpt_core.config import ExperimentConfig


def cmd_compile(args: argparse.Namespace) -> dict:
    from components import default_image
    from pipelines.dvpt_pipeline import compile_pipeline

    image = args.image or default_image()
    path = compile_pipeline(args.out, config_from_args(args), image, args.data_pvc, args.tracking_secret)
    return {"package": str(path), "image": image, "data_pvc": args.data_pvc, "tracking_secret": args.tracking_secret}


def cmd_run_local(args: argparse.Namespace) -> dict:
    from pipelines.dvpt_pipeline import run_local

    return run_local(config_from_args(args), args.data, args.pipeline_root)


def cmd_submit(args: argparse.Namespace) -> dict:
    from pipelines.dvpt_pipeline import submit

    if args.package and (args.params or args.overrides or args.preset or args.image or args.data_pvc
                         or args.tracking_secret):
        raise ValueError("--package carries the configuration, image, volume and secret it was compiled with: "
                         "drop --params/--preset/--set/--image/--data-pvc/--tracking-secret, or drop --package "
                         "to compile now")
    return submit(args.package or config_from_args(args), host=args.host, data_dir=args.data,
                  experiment=args.experiment, namespace=args.namespace, token=args.token,
                  run_name=args.run_name, image=args.image, data_pvc=args.data_pvc,
                  tracking_secret=args.tracking_secret)


def cmd_compile_predict(args: argparse.Namespace) -> dict:
    from components import default_image
    from pipelines.predict_pipeline import compile_predict

    image = args.image or default_image()
    return {"package": str(compile_predict(args.out, config_from_args(args), image, args.data_pvc)), "image": image}


def cmd_predict_local(args: argparse.Namespace) -> dict:
    from pipelines.predict_pipeline import run_predict_local

    return run_predict_local(config_from_args(args), args.data, args.pipeline_root, args.model or "")


def _grid(args: argparse.Namespace, cfg: ExperimentConfig) -> list[dict]:
    """The cells the flags ask for, each checked against the schema now rather than in a pod later."""
    from dvpt_core.steps.compare import (
        ALL_METHODS, DEFAULT_RATIOS, DEFAULT_SEEDS, cell_config, expand_grid, parse_method_overrides,
    )

    methods = args.methods or ALL_METHODS
    grid = expand_grid(methods, args.seeds or DEFAULT_SEEDS, args.label_ratios or DEFAULT_RATIOS,
                       parse_method_overrides(args.method_set, methods))
    for cell in grid:
        cell_config(cfg, cell)
    return grid


def cmd_compile_compare(args: argparse.Namespace) -> dict:
    from components import default_image
    from pipelines.compare_pipeline import compile_compare

    image = args.image or default_image()
    cfg = config_from_args(args)
    grid = _grid(args, cfg)
    path = compile_compare(args.out, cfg, grid, image, args.data_pvc, args.tracking_secret)
    return {"package": str(path), "image": image, "data_pvc": args.data_pvc, "tracking_secret": args.tracking_secret,
            "cells": len(grid)}


def cmd_compare_local(args: argparse.Namespace) -> dict:
    from pipelines.compare_pipeline import run_compare_local

    cfg = config_from_args(args)
    return run_compare_local(cfg, _grid(args, cfg), args.data, args.pipeline_root)


def _grid_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="+", help="methods to compare (default: every model.method)")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="repetitions: training seed and labelled-subset seed (default: 0 1 2)")
    parser.add_argument("--label-ratios", nargs="+", type=float,
                        help="labelled shares of the training split (default: 0.1 0.2 0.4 1.0)")
    parser.add_argument("--method-set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="an override for one method's cells, e.g. full:train.lr=0.0003 (repeatable)")


def add_kfp_commands(subparsers: argparse._SubParsersAction,
                     config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Adds ``kfp`` with its subcommands; each handler returns a dict the CLI prints as JSON."""
    kfp = subparsers.add_parser("kfp", help="compile, run locally or submit the Kubeflow pipelines")
    sub = kfp.add_subparsers(dest="kfp_command", required=True)
    image_help = "container image of every component (default: $DVPT_IMAGE, else dvpt-mlops:0.1.0)"
    pvc_help = "PersistentVolumeClaim holding the data, mounted at /mnt/data (--data then lies under it)"
    secret_help = ("Kubernetes secret whose keys MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN become the MLflow "
                   "tasks' environment (credentials are never compiled into the pipeline)")

    def compile_command(name: str, help_text: str, out: str, func: Callable, grid: bool) -> None:
        parser = sub.add_parser(name, help=help_text)
        config_args(parser)
        if grid:
            _grid_args(parser)
        parser.add_argument("--out", type=Path, default=Path(out), help=f"default: {out}")
        parser.add_argument("--image", help=image_help)
        parser.add_argument("--data-pvc", help=pvc_help)
        parser.add_argument("--tracking-secret", help=secret_help)
        parser.set_defaults(func=func)

    def local_command(name: str, help_text: str, func: Callable, grid: bool) -> None:
        parser = sub.add_parser(name, help=help_text)
        config_args(parser)
        if grid:
            _grid_args(parser)
        parser.add_argument("--data", type=Path, required=True, help="dataset folder")
        parser.add_argument("--pipeline-root", type=Path, default=Path("local_outputs"),
                            help="where task outputs go (default: local_outputs)")
        parser.set_defaults(func=func)

    compile_command("compile", "compile the pipeline to KFP IR YAML", "pipeline.yaml", cmd_compile, grid=False)
    local_command("run-local", "run the pipeline here with kfp.local (no cluster, no Docker)", cmd_run_local,
                  grid=False)
    compile_command("compile-compare", "compile the method-comparison pipeline (methods x seeds x label "
                    "ratios, one HTML report; submit it with submit --package)", "compare.yaml",
                    cmd_compile_compare, grid=True)
    local_command("compare-local", "run the method-comparison pipeline here with kfp.local", cmd_compare_local,
                  grid=True)

    compile_command("compile-predict", "compile the batch-inference pipeline (submit it with submit --package)",
                    "predict.yaml", cmd_compile_predict, grid=False)
    local_command("predict-local", "run the batch-inference pipeline here with kfp.local", cmd_predict_local,
                  grid=False)
    sub.choices["predict-local"].add_argument("--model", help="models:/NAME@ALIAS or models:/NAME/VERSION "
                                              "(default: the configured registered model's @champion)")

    submit = sub.add_parser("submit", help="submit a run to a Kubeflow Pipelines host")
    config_args(submit)
    submit.add_argument("--host", required=True, help="KFP API address, e.g. https://kubeflow.example.com/pipeline")
    submit.add_argument("--namespace", help="Kubeflow profile namespace (multi-user deployments)")
    submit.add_argument("--experiment", default="dvpt", help="KFP experiment name (default: dvpt)")
    submit.add_argument("--token", help="bearer token (default: $KF_PIPELINES_TOKEN)")
    submit.add_argument("--data", required=True, help="dataset folder as the pipeline's pods see it")
    submit.add_argument("--package", type=Path, help="a package from compile or compile-compare "
                        "(default: compile the DVPT pipeline from the configuration now)")
    submit.add_argument("--run-name", help="run name shown in the KFP UI")
    submit.add_argument("--image", help=image_help + "; not with --package")
    submit.add_argument("--data-pvc", help=pvc_help + "; not with --package")
    submit.add_argument("--tracking-secret", help=secret_help + "; not with --package")
    submit.set_defaults(func=cmd_submit)
