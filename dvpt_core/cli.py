"""The ``dvpt`` command: one subcommand per pipeline step, plus summary, run, promote and kfp.

Every step subcommand parses the one configuration schema (``--params``, ``--preset``, ``--set``)
and calls the same plain function the Kubeflow components call.

A failure a user can cause (a bad setting, file or dataset, a full disk, an unreachable tracking
server) ends in one line on stderr, ``dvpt STEP: error: ...`` naming the file, field or value at
fault, and exit status 2; ``--debug`` adds the traceback. Anything else is a bug and keeps its
traceback. Credentials inside URIs are masked in everything printed or logged.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from dvpt_core.config import ExperimentConfig, load_config
from dvpt_core.secrets import mask_logging, mask_text
from dvpt_core.signals import Terminated

log = logging.getLogger("dvpt")
# What a user can cause: settings, files and data (ValueError: ConfigError, AdapterError,
# DatasetFormatError, DataValidationError...), the file system (OSError: missing files, a full
# disk), the runtime (RuntimeError: no CUDA device, ONNX parity). MLflow's errors are added where
# mlflow was imported (see ``_user_error``).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# Drivers add their subcommands through this entry-point group (pyproject.toml), so the core never
# imports them: `dvpt kfp ...` comes from pipelines.cli.
COMMAND_PLUGINS = "dvpt.commands"


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", type=Path, help="YAML experiment file (e.g. params.yaml)")
    parser.add_argument("--preset", help="a named preset under dvpt_core/presets (e.g. ddr-paper)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting, e.g. --set model.prompts=10 (repeatable)")
    _debug_arg(parser, default=argparse.SUPPRESS)


def _debug_arg(parser: argparse.ArgumentParser, default: object) -> None:
    """``--debug`` before or after the subcommand (SUPPRESS: a subcommand's absent flag keeps the
    top level's value)."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the traceback of an error (errors are one line without it)")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The configuration that ``--params``, ``--preset`` and ``--set`` describe (every subcommand)."""
    return load_config(args.params, args.overrides, args.preset)


def _print(result: dict) -> None:
    print(mask_text(json.dumps(result, indent=2, default=str)))


def cmd_generate_data(args: argparse.Namespace) -> dict:
    from dvpt_core.data.synthetic import generate_dataset

    cfg = config_from_args(args)
    generate_dataset(args.out, cfg, overwrite=args.overwrite)
    return {"data": str(args.out), "format": cfg.data.format, **cfg.synthetic.model_dump()}


def cmd_pretrain(args: argparse.Namespace) -> dict:
    from dvpt_core.steps.pretrain import pretrain_if_stand_in

    return pretrain_if_stand_in(config_from_args(args), args.out)


def cmd_validate(args: argparse.Namespace) -> dict:
    from dvpt_core.steps.validate import validate

    return validate(config_from_args(args), args.data, args.out)


def cmd_preprocess(args: argparse.Namespace) -> dict:
    from dvpt_core.steps.preprocess import preprocess

    return preprocess(config_from_args(args), args.data, args.out, args.validation)


def cmd_train(args: argparse.Namespace) -> dict:
    from dvpt_core.steps.train import train

    return train(config_from_args(args), args.cache, args.out, data_root=args.data, validation_dir=args.validation)


def cmd_sync(args: argparse.Namespace) -> dict:
    from dvpt_core.steps.sync import sync

    return sync(config_from_args(args), args.train)


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from dvpt_core.steps.evaluate import evaluate

    return evaluate(config_from_args(args), args.cache, args.train, args.out)


def cmd_export(args: argparse.Namespace) -> dict:
    from dvpt_core.steps.export import export

    return export(config_from_args(args), args.cache, args.train, args.out)


def cmd_register(args: argparse.Namespace) -> dict:
    from dvpt_core.steps.register import register

    return register(config_from_args(args), args.train, args.export, args.out)


def cmd_promote(args: argparse.Namespace) -> dict:
    from dvpt_core.steps.register import promote

    return promote(config_from_args(args), args.version, args.alias)


def cmd_run(args: argparse.Namespace) -> dict:
    """Every step in order, without DVC: the same functions ``dvc repro`` runs."""
    from dvpt_core.steps.pipeline import run_all

    return run_all(config_from_args(args), args.data, args.out)


def cmd_summary(args: argparse.Namespace) -> dict:
    from dvpt_core.summary import summarize

    overrides = [f"model.backbone={args.backbone}", f"model.method={args.method}", "model.weights=random",
                 *args.overrides]
    cfg = load_config(args.params, overrides, args.preset)
    cfg.data.class_names = [f"class_{i}" for i in range(args.num_classes)]
    return summarize(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvpt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _debug_arg(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable, help_text: str, optional: tuple[str, ...] = (),
            **paths: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _config_args(p)
        for flag, path_help in paths.items():
            p.add_argument(f"--{flag}", type=Path, required=flag not in optional, help=path_help)
        p.set_defaults(func=func)
        return p

    gen = add("generate-data", cmd_generate_data, "write a built-in synthetic dataset in data.format's layout (ddr, kvasir, acdc)")
    gen.add_argument("--out", type=Path, default=Path("data"), help="dataset folder (default: data)")
    gen.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    add("pretrain", cmd_pretrain, "pre-train the stand-in backbone on the synthetic source task (only with model.weights=stand-in)",
        out="folder for backbone.safetensors and pretrain.json")
    add("validate", cmd_validate, "check a dataset with Great Expectations",
        data="dataset folder", out="folder for manifest, validation.json and Data Docs")
    add("preprocess", cmd_preprocess, "resize and cache the splits the validate step passed as memory-mapped arrays",
        data="dataset folder", validation="the validate step's output folder for this dataset", out="cache folder")
    add("train", cmd_train, "train the configured method on the frozen backbone (logs to MLflow)",
        optional=("data", "validation"), cache="preprocessed cache folder", out="folder for the adapter and run.json",
        data="dataset folder, for the DVC lineage hash (optional)",
        validation="the validate step's folder, logged to the run (optional)")
    add("sync", cmd_sync, "send a finished train step's results MLflow has not received yet (after an outage)",
        train="train step folder")
    add("evaluate", cmd_evaluate, "score the adapter on the test split",
        cache="preprocessed cache folder", train="train step folder", out="metrics folder")
    add("export", cmd_export, "export backbone + adapter to ONNX and check parity",
        cache="preprocessed cache folder", train="train step folder", out="export folder")
    add("register", cmd_register, "register the adapter in the MLflow model registry",
        train="train step folder", export="export step folder", out="folder for registered.json")
    promote = add("promote", cmd_promote, "point an alias (default champion) at a registered version")
    promote.add_argument("--version", required=True, help="model version number")
    promote.add_argument("--alias", default="champion")
    run = add("run", cmd_run, "run every step in order without DVC")
    run.add_argument("--data", type=Path, default=Path("data"))
    run.add_argument("--out", type=Path, default=Path("outputs"))

    summary = sub.add_parser("summary", help="trainable / total parameters and adapter size")
    _config_args(summary)
    summary.add_argument("--backbone", required=True, help="timm model name")
    summary.add_argument("--method", default="dvpt")
    summary.add_argument("--num-classes", type=int, required=True)
    summary.add_argument("--json", action="store_true", help="print JSON only")
    summary.set_defaults(func=cmd_summary)

    for plugin in entry_points(group=COMMAND_PLUGINS):
        plugin.load()(sub, _config_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    mask_logging()
    step = " ".join(filter(None, (args.command, getattr(args, "kfp_command", None))))
    try:
        result = args.func(args)
    except (KeyboardInterrupt, Terminated) as stop:
        _report(step, f"interrupted ({stop or 'Ctrl-C'})", args.debug)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001  (user errors become one line; anything else re-raises)
        if not _user_error(err):
            raise
        _report(step, f"error: {describe(err)}", args.debug)
        return EXIT_USER_ERROR
    _warn_about_weights(result)
    if args.command == "summary" and not args.json:
        print(_summary_text(result))
    else:
        _print(result)
    return 0


def _warn_about_weights(result: dict) -> None:
    """The last line a user reads says so when the backbone was not a real pretrained one."""
    if result.get("random_weights") in (True, "true"):
        print("WARNING: RANDOM WEIGHTS - this result comes from a randomly initialised backbone", file=sys.stderr)
    elif result.get("stand_in_weights") in (True, "true") or result.get("stand_in") is True:
        print("WARNING: STAND-IN WEIGHTS - this result comes from a backbone pre-trained here on synthetic data, "
              "not from a foundation model", file=sys.stderr)
def _user_error(err: BaseException) -> bool:
    """Whether ``err`` is one a user causes; MLflow's count only once mlflow was imported (the
    check must not import it: it takes seconds)."""
    mlflow_errors = sys.modules.get("mlflow.exceptions")
    return isinstance(err, USER_ERRORS) or (
        mlflow_errors is not None and isinstance(err, mlflow_errors.MlflowException))


def describe(err: BaseException) -> str:
    """The error's message without Python's decoration: an OSError's ``[Errno N]`` prefix goes,
    the file it names stays; an empty message becomes the error's type."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    return str(err) or type(err).__name__


def _report(step: str, message: str, debug: bool) -> None:
    """The message's detail lines, then (with ``--debug``) the traceback, then the one line that
    ends the output: ``dvpt STEP: error: ...``. Every part has its URIs masked."""
    head, *details = mask_text(message).splitlines() or [""]
    for line in details:
        print(f"  {line}", file=sys.stderr)
    if debug:
        print(mask_text(traceback.format_exc()), file=sys.stderr, end="")
    print(f"dvpt {step}: {head}", file=sys.stderr)


def _summary_text(summary: dict) -> str:
    lines = [
        f"{summary['backbone']} + {summary['method']} ({summary['num_classes']} classes)",
        f"  trainable  {summary['trainable']:>13,}  ({summary['trainable_percent']:.3f}% of {summary['total']:,})",
        f"  adapter    {summary['adapter_bytes']:>13,} bytes",
    ]
    lines += [f"    {part:<20} {count:>11,}" for part, count in summary["trainable_by_part"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
