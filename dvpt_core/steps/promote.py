"""Promote step: the quality gate after register (``dvpt_core.registry.promotion``) as the
pipelines run it: the version the register step created is the challenger, and the decision is
written to ``decision.json`` (``promoted``, ``rejected`` or ``skipped`` when nothing was
registered). A refused comparison (other test data, no per-sample records, a champion that moved)
is recorded and then fails the step: someone has to choose what to compare.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dvpt_core.config import ExperimentConfig
from dvpt_core.data.atomic import atomic_file
from dvpt_core.registry.promotion import DECISION_FILE, PromotionRefused, promote

log = logging.getLogger(__name__)
REGISTERED_FILE = "registered.json"
SKIPPED = "skipped"


def promote_step(cfg: ExperimentConfig, registration_dir: Path | None = None, out_dir: Path | None = None,
                 version: str | None = None, why: str = "") -> dict:
    """Decide on ``version``, else on the version in ``registration_dir/registered.json``, else on
    the version at ``tracking.alias``; the decision goes to ``out_dir/decision.json`` if given."""
    if version is None and registration_dir is not None:
        registered = _registered(Path(registration_dir))
        if not registered.get("registered"):
            result = {"decision": SKIPPED, "reason": f"nothing registered: {registered.get('reason', '')}"}
            return _write(out_dir, result)
        version = str(registered["version"])
    try:
        result = promote(cfg, version, why)
    except PromotionRefused as err:
        _write(out_dir, {"decision": "refused", "reason": str(err), "challenger": version})
        raise
    return _write(out_dir, result)


def _registered(registration_dir: Path) -> dict:
    path = registration_dir / REGISTERED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the register step first")
    return json.loads(path.read_text())


def _write(out_dir: Path | None, result: dict) -> dict:
    if out_dir is not None:
        with atomic_file(Path(out_dir) / DECISION_FILE) as tmp:
            tmp.write_text(json.dumps(result, indent=2, default=str))
    log.info("promotion: %s (%s)", result["decision"], result.get("reason", ""))
    return result
