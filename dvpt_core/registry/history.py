"""The champion's history on the model versions, and the one way the champion alias moves.

Every decision and alias move is an event tag on the versions it concerns
(``history.<UTC time>`` = JSON with the action, who, why and the other version), so a version
carries its own story and nothing is overwritten. A new champion also gets ``champion.previous``
(the version it replaced): rollback follows that chain back.

Moving the alias is a compare-and-set: MLflow has no conditional alias update, so the move
happens under a registry lock and only if the alias still points where the caller saw it when
it started deciding. The lock is a registered model named ``<name>.promotion-lock``: creating a
registered model is atomic in MLflow's store (its name is the table's unique key), so of two
promotions racing exactly one creates it; the other waits, then finds the champion moved and
refuses. A lock older than ``promotion.lock_timeout_s`` is taken as left by a crashed process and
removed.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import secrets
import time
from collections.abc import Iterator
from datetime import datetime, timezone

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dvpt_core.config import ExperimentConfig
from dvpt_core.registry.versions import RegistryError, VersionInfo, get_version, version_by_alias

log = logging.getLogger(__name__)
EVENT_PREFIX = "history."
PREVIOUS_CHAMPION_TAG = "champion.previous"
LOCK_SUFFIX = ".promotion-lock"
LOCK_POLL_S = 0.2


class ChampionMoved(RuntimeError):
    """The champion alias changed while a decision was being made: the decision is stale."""


def actor() -> str:
    """Who acts: ``$DVPT_USER`` where set (a pipeline's service account), else the OS user."""
    return os.environ.get("DVPT_USER") or getpass.getuser()


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def record_event(client: MlflowClient, info: VersionInfo, action: str, why: str, **details: str) -> dict:
    """Append an event to ``info``'s history (a new tag; tag keys allow no colons, hence the format)."""
    when = utc_now()
    event = {"action": action, "at": when.isoformat(timespec="seconds"), "by": actor(), "why": why, **details}
    key = f"{EVENT_PREFIX}{when:%Y%m%dT%H%M%S.%f}Z.{secrets.token_hex(2)}"
    client.set_model_version_tag(info.name, info.version, key, json.dumps(event))
    return event


def events(info: VersionInfo) -> list[dict]:
    """The version's history, oldest first."""
    return [json.loads(info.tags[key]) for key in sorted(k for k in info.tags if k.startswith(EVENT_PREFIX))]


@contextlib.contextmanager
def registry_lock(client: MlflowClient, name: str, timeout_s: float) -> Iterator[None]:
    """Hold the promotion lock of registered model ``name`` (see the module docstring)."""
    lock = f"{name}{LOCK_SUFFIX}"
    token = secrets.token_hex(8)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": token, "by": actor(), "since": str(time.time())},
                                           description=f"held while a promotion of {name} moves its alias")
            break
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if _stale(client, lock, timeout_s):
            log.warning("removing the promotion lock %s: held longer than %.0f s", lock, timeout_s)
            _delete(client, lock)
        elif time.monotonic() > deadline:
            raise ChampionMoved(f"another promotion of {name} has held {lock} for over {timeout_s:.0f} s")
        time.sleep(LOCK_POLL_S)
    try:
        yield
    finally:
        _delete(client, lock)


def _stale(client: MlflowClient, lock: str, timeout_s: float) -> bool:
    try:
        since = float(client.get_registered_model(lock).tags.get("since", "0"))
    except MlflowException:
        return False
    return time.time() - since > timeout_s


def _delete(client: MlflowClient, lock: str) -> None:
    with contextlib.suppress(MlflowException):
        client.delete_registered_model(lock)


def version_number(info: VersionInfo | None) -> str | None:
    """The version number of ``info``, None for no version (an unset alias)."""
    return info.version if info else None


def move_alias(client: MlflowClient, name: str, alias: str, version: str, expected: str | None,
               timeout_s: float) -> None:
    """Point ``alias`` at ``version`` only if it still points at ``expected`` (None: unset)."""
    with registry_lock(client, name, timeout_s):
        now = version_number(version_by_alias(client, name, alias))
        if now != expected:
            raise ChampionMoved(f"@{alias} of {name} moved from version {expected or '(none)'} to "
                                f"{now or '(none)'} while this decision was made")
        client.set_registered_model_alias(name, alias, version)


def rollback(cfg: ExperimentConfig, why: str, to_version: str | None = None) -> dict:
    """Move the champion back to the version it replaced (or to ``to_version``), recording who,
    when and why on both versions. The alias move is the last step (compare-and-set)."""
    from dvpt_core.registry.model_card import publish_model_card
    from dvpt_core.tracking import connect

    connect(cfg)
    client = MlflowClient()
    name, alias = cfg.tracking.registered_model, cfg.promotion.champion_alias
    current = version_by_alias(client, name, alias)
    if current is None:
        raise RegistryError(f"{name} has no @{alias}: nothing to roll back")
    target_version = to_version or current.tags.get(PREVIOUS_CHAMPION_TAG)
    if not target_version or target_version == "none":
        raise RegistryError(f"{current.label} is the first champion of {name}: there is no previous one "
                            "(name a version with --to)")
    target = get_version(client, name, target_version)
    if target.version == current.version:
        raise RegistryError(f"{current.label} is already @{alias}")
    if target.random_weights:
        raise RegistryError(f"{target.label} has a backbone on RANDOM WEIGHTS: it is never made champion")
    record_event(client, current, "rolled_back", why, to_version=target.version)
    record_event(client, target, "restored", why, from_version=current.version)
    for info in (current, target):
        publish_model_card(client, get_version(client, name, info.version))
    try:
        move_alias(client, name, alias, target.version, current.version, cfg.promotion.lock_timeout_s)
    except ChampionMoved as err:
        for info in (current, target):
            record_event(client, info, "rollback_refused", str(err))
        raise
    log.info("%s: @%s moved back from version %s to %s (%s)", name, alias, current.version, target.version, why)
    return {"registered_model": name, "alias": alias, "from_version": current.version,
            "to_version": target.version, "why": why, "by": actor(),
            "random_weights": target.random_weights, "stand_in_weights": target.stand_in}
