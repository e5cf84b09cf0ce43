"""The drivers (pipelines/, components/) depend on the core, never the reverse."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVERS = {"pipelines", "components"}


def _imported_packages(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_dvpt_core_imports_no_driver() -> None:
    offenders = {str(p.relative_to(ROOT)): sorted(_imported_packages(p) & DRIVERS)
                 for p in (ROOT / "dvpt_core").rglob("*.py") if _imported_packages(p) & DRIVERS}
    assert offenders == {}


def test_the_kfp_subcommands_reach_the_cli_through_the_entry_point() -> None:
    from dvpt_core.cli import build_parser

    args = build_parser().parse_args(["kfp", "compile", "--out", "pipeline.yaml"])
    assert args.command == "kfp" and args.kfp_command == "compile"
