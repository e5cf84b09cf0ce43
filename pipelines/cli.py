"""``dvpt kfp compile | run-local | submit | compile-compare | compare-local | compile-predict |
predict-local``: the Kubeflow side of the ``dvpt`` command.

Each subcommand takes the same configuration flags as the step subcommands (``--params``,
``--preset``, ``--set``), so one experiment definition drives DVC, local runs and Kubeflow. The
compile subcommands add the cluster's settings (:class:`dvpt_core.config.KubeflowConfig`, one flag
per field: ``--gpus``, ``--accelerator-type``, ``--cpu``, ``--memory``, ``--data-repo``,
``--train-launcher pytorchjob``...); ``submit`` adds the run's typed parameters (``--method``,
``--epochs``, ``--learning-rate``, ``--label-ratio``, ``--seed``, ``--data-revision``). The
comparison subcommands add the grid (``--methods``, ``--seeds``, ``--label-ratios`` and
per-method ``--method-set METHOD:KEY=VALUE``); a compiled comparison is submitted with
``submit --package``.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from dvpt_core.cli import config_from_args
from dvpt_core.config import RUN_PARAMETERS, ConfigError, ExperimentConfig, KubeflowConfig

# The data parameters of a run: compiled defaults (KubeflowConfig) that a submission may override.
DATA_PARAMETERS = ("data_repo", "data_path", "data_revision")


def kubeflow_from_args(args: argparse.Namespace) -> KubeflowConfig:
    """The cluster settings the flags give, the schema's defaults for the rest."""
    given = {name: getattr(args, name) for name in KubeflowConfig.model_fields if getattr(args, name, None) is not None}
    try:
        return KubeflowConfig(**given)
    except ValidationError as err:
        problems = "; ".join(f"--{str(e['loc'][0]).replace('_', '-') if e['loc'] else ''}: {e['msg']}"
                             for e in err.errors())
        raise ConfigError(f"invalid cluster settings: {problems}") from None


def run_arguments_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The run parameters the flags set (typed ones and the data's), for a submission."""
    names = [*RUN_PARAMETERS, *DATA_PARAMETERS]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def cmd_compile(args: argparse.Namespace) -> dict:
    from components import default_image
    from pipelines.dvpt_pipeline import compile_pipeline

    image, settings = args.image or default_image(), kubeflow_from_args(args)
    path = compile_pipeline(args.out, config_from_args(args), image, settings)
    return {"package": str(path), "image": image, "settings": settings.model_dump()}


def cmd_run_local(args: argparse.Namespace) -> dict:
    from pipelines.dvpt_pipeline import run_local

    return run_local(config_from_args(args), args.data, args.pipeline_root)


def cmd_submit(args: argparse.Namespace) -> dict:
    from pipelines.dvpt_pipeline import submit

    compile_only = [f"--{name.replace('_', '-')}" for name in KubeflowConfig.model_fields
                    if name not in DATA_PARAMETERS and getattr(args, name) is not None]
    if args.package and (args.params or args.overrides or args.preset or args.image or compile_only):
        raise ValueError("--package carries the configuration, image and cluster settings it was compiled with: "
                         f"drop --params/--preset/--set/--image{'/' + '/'.join(compile_only) if compile_only else ''}"
                         ", or drop --package to compile now")
    pipeline = args.package or config_from_args(args)
    return submit(pipeline, host=args.host, arguments=run_arguments_from_args(args), experiment=args.experiment,
                  namespace=args.namespace, token=args.token, run_name=args.run_name, image=args.image,
                  settings=None if args.package else kubeflow_from_args(args))


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

    image, settings = args.image or default_image(), kubeflow_from_args(args)
    cfg = config_from_args(args)
    grid = _grid(args, cfg)
    path = compile_compare(args.out, cfg, grid, image, settings)
    return {"package": str(path), "image": image, "settings": settings.model_dump(), "cells": len(grid)}


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


def _field_flag(parser: argparse.ArgumentParser, flag: str, annotation: Any, help_text: str, dest: str) -> None:
    """A flag typed as the schema field ``annotation`` is (choices for a Literal), default None
    (unset: the schema's or the package's default applies)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    kind = annotation
    if typing.get_origin(kind) is typing.Literal:
        parser.add_argument(flag, dest=dest, choices=typing.get_args(kind), help=help_text)
    else:
        parser.add_argument(flag, dest=dest, type=kind, help=help_text)


def _kubeflow_args(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`KubeflowConfig` field, its help from the field's description."""
    group = parser.add_argument_group("cluster settings (compile time)")
    for name, field in KubeflowConfig.model_fields.items():
        _field_flag(group, f"--{name.replace('_', '-')}", field.annotation,
                    f"{field.description} (default: {field.default})", name)


def _run_args(parser: argparse.ArgumentParser) -> None:
    """One flag per typed run parameter, typed as the setting it overrides."""
    group = parser.add_argument_group("run parameters (default: the package's)")
    for name, key in RUN_PARAMETERS.items():
        _field_flag(group, f"--{name.replace('_', '-')}", _schema_field(key).annotation, f"sets {key}", name)


def _schema_field(key: str) -> Any:
    model: type[BaseModel] = ExperimentConfig
    *sections, last = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    return model.model_fields[last]


def add_kfp_commands(subparsers: argparse._SubParsersAction,
                     config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Adds ``kfp`` with its subcommands; each handler returns a dict the CLI prints as JSON."""
    kfp = subparsers.add_parser("kfp", help="compile, run locally or submit the Kubeflow pipelines")
    sub = kfp.add_subparsers(dest="kfp_command", required=True)
    image_help = "container image of every component (default: $DVPT_IMAGE, else dvpt-mlops:0.1.0)"

    def compile_command(name: str, help_text: str, out: str, func: Callable, grid: bool) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text)
        config_args(parser)
        if grid:
            _grid_args(parser)
        parser.add_argument("--out", type=Path, default=Path(out), help=f"default: {out}")
        parser.add_argument("--image", help=image_help)
        parser.set_defaults(func=func)
        return parser

    def local_command(name: str, help_text: str, func: Callable, grid: bool) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text)
        config_args(parser)
        if grid:
            _grid_args(parser)
        parser.add_argument("--data", type=Path, required=True, help="dataset folder")
        parser.add_argument("--pipeline-root", type=Path, default=Path("local_outputs"),
                            help="where task outputs go (default: local_outputs)")
        parser.set_defaults(func=func)
        return parser

    _kubeflow_args(compile_command("compile", "compile the pipeline to KFP IR YAML", "pipeline.yaml", cmd_compile,
                                   grid=False))
    local_command("run-local", "run the pipeline here with kfp.local on a local dataset folder (no cluster, "
                  "no Docker)", cmd_run_local, grid=False)
    _kubeflow_args(compile_command("compile-compare", "compile the method-comparison pipeline (methods x seeds x "
                                   "label ratios, one HTML report; submit it with submit --package)", "compare.yaml",
                                   cmd_compile_compare, grid=True))
    local_command("compare-local", "run the method-comparison pipeline here with kfp.local", cmd_compare_local,
                  grid=True)

    predict = compile_command("compile-predict", "compile the batch-inference pipeline (submit it with submit "
                              "--package)", "predict.yaml", cmd_compile_predict, grid=False)
    predict.add_argument("--data-pvc", help="PersistentVolumeClaim holding the images to score, mounted at "
                         "/mnt/data (the run's data_dir then lies under it)")
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
    submit.add_argument("--package", type=Path, help="a package from compile or compile-compare "
                        "(default: compile the DVPT pipeline from the configuration now)")
    submit.add_argument("--run-name", help="run name shown in the KFP UI")
    submit.add_argument("--image", help=image_help + "; not with --package")
    _run_args(submit)
    _kubeflow_args(submit)
    submit.set_defaults(func=cmd_submit)
