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
    from dvpt_core.steps.promote import promote_step

    overrides = [*args.overrides, f"promotion.champion_alias={args.alias}"]
    if args.allow_different_data:
        overrides.append("promotion.allow_different_data=true")
    cfg = load_config(args.params, overrides, args.preset)
    return promote_step(cfg, args.registration, args.out, args.version, args.why)


def cmd_rollback(args: argparse.Namespace) -> dict:
    from dvpt_core.registry.history import rollback

    return rollback(config_from_args(args), args.why, args.to)


def cmd_registry(args: argparse.Namespace) -> dict:
    from dvpt_core.registry.listing import registry_rows

    return registry_rows(config_from_args(args))


def cmd_predict(args: argparse.Namespace) -> dict:
    import mlflow

    from dvpt_core.steps.predict import predict

    mlflow.set_tracking_uri(config_from_args(args).tracking.resolved_uri())
    return predict(args.model, args.input, args.out, args.runtime, args.column, args.batch_size, args.weights_file)


def cmd_serve(args: argparse.Namespace) -> dict:
    import mlflow
    import uvicorn

    from dvpt_core.serving.pool import AdapterPool
    from dvpt_core.serving.server import AdapterSpec, create_app

    mlflow.set_tracking_uri(config_from_args(args).tracking.resolved_uri())
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    specs = {}
    for runtime, items in (("torch", args.adapter), ("onnx", args.onnx_adapter)):
        for item in items:
            name, sep, uri = item.partition("=")
            if not sep or not name or not uri:
                raise ValueError(f"adapter {item!r} is not NAME=URI (e.g. ddr=models:/dvpt-ddr@champion)")
            specs[name] = AdapterSpec(uri=uri, runtime=runtime)
    pool = AdapterPool(args.cache_dir, args.weights_file)
    uvicorn.run(create_app(pool, specs, args.watch), host=args.host, port=args.port, log_level="info")
    return {"served": sorted(specs)}


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
    promote = add("promote", cmd_promote, "quality gate: make the challenger champion if it beats (or is "
                  "non-inferior to) the champion on the same test data", optional=("registration", "out"),
                  registration="register step folder: decide on the version it registered (pipelines)",
                  out="folder for decision.json")
    promote.add_argument("--version", help="model version to decide on (default: the one at tracking.alias)")
    promote.add_argument("--alias", default="champion", help="the alias the gate moves (default: champion)")
    promote.add_argument("--allow-different-data", action="store_true",
                         help="compare versions evaluated on other data (unpaired) instead of refusing")
    promote.add_argument("--why", default="", help="a note recorded with the decision")
    rollback = add("rollback", cmd_rollback, "move the champion back to the version it replaced")
    rollback.add_argument("--why", required=True, help="the reason, recorded on both versions")
    rollback.add_argument("--to", help="a version to restore instead of the previous champion")
    registry = add("registry", cmd_registry, "list versions, aliases, metrics and promotion decisions")
    registry.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    pred = add("predict", cmd_predict, "batch inference: a registered adapter over a folder, a CSV of image paths "
               "or a DVC-tracked dataset folder", input="folder of images or CSV file", out="folder for "
               "predictions.csv and summary.json")
    pred.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or an adapter folder")
    pred.add_argument("--runtime", choices=("torch", "onnx"), default="torch")
    pred.add_argument("--column", default="image", help="the CSV column naming images (default: image)")
    pred.add_argument("--batch-size", type=int, default=16)
    pred.add_argument("--weights-file", type=Path, help="the backbone checkpoint on this machine "
                      "(default: $DVPT_BACKBONE_WEIGHTS, else where training had it)")
    serve = add("serve", cmd_serve, "serve many adapters over one frozen backbone over HTTP (FastAPI)")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=URI",
                       help="an adapter on the shared backbone, e.g. ddr=models:/dvpt-ddr@champion (repeatable)")
    serve.add_argument("--onnx-adapter", action="append", default=[], metavar="NAME=URI",
                       help="an adapter served from its registered ONNX graph (repeatable)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--watch", type=float, help="seconds between checks for moved aliases (hot swap); off if unset")
    serve.add_argument("--weights-file", type=Path, help="the backbone checkpoint on this machine")
    serve.add_argument("--threads", type=int, help="CPU threads per inference, PyTorch and ONNX Runtime alike "
                       "(default: PyTorch's, the number of cores)")
    serve.add_argument("--cache-dir", type=Path, default=Path(".dvpt-serving"),
                       help="where downloaded adapters are kept (default: .dvpt-serving)")
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
    text = TEXT_OUTPUTS.get(args.command)
    if text and not args.json:
        print(text(result))
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


def _registry_text(result: dict) -> str:
    from dvpt_core.registry.listing import registry_text

    return registry_text(result)


# Subcommands that print a human-readable text unless given --json.
TEXT_OUTPUTS: dict[str, Callable[[dict], str]] = {"summary": _summary_text, "registry": _registry_text}


if __name__ == "__main__":
    sys.exit(main())
