"""The promotion gate: its statistics against independent references, its rule, and its whole
life cycle (promote, refuse, roll back, race) against a real MLflow server on loopback, on
versions built by the real train / evaluate / register steps."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score

from dvpt_core.cli import main
from dvpt_core.config import PromotionConfig
from dvpt_core.metrics.per_sample import RecordsError, classification_records
from dvpt_core.registry.bootstrap import Estimate, compare, compare_dice, compare_kappa, quadratic_kappa
from dvpt_core.registry.history import events, rollback
from dvpt_core.registry.listing import registry_rows, registry_text
from dvpt_core.registry.promotion import PROMOTED, REFUSED, REJECTED, PromotionRefused, decide, promote
from dvpt_core.registry.versions import RegistryError, VersionInfo, get_version, version_by_alias
from tests.registry_helpers import register_run, registry_runs, with_overrides  # noqa: F401  (fixture)

SETTINGS = PromotionConfig(resamples=1000)

# --- statistics -----------------------------------------------------------------------------------


def test_vectorised_kappa_matches_scikit_learn_per_resample() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(30, 60))
    preds = np.clip(labels + rng.integers(-2, 3, size=labels.shape), 0, 4)
    preds[0] = labels[0]  # perfect
    labels[1], preds[1] = 2, 2  # one constant class: 0/0, reported as 0
    got = quadratic_kappa(labels * 5 + preds, 5)
    expected = [cohen_kappa_score(l, p, weights="quadratic", labels=range(5)) for l, p in zip(labels[2:], preds[2:])]
    np.testing.assert_allclose(got[2:], expected, rtol=1e-12)
    assert got[0] == 1.0 and got[1] == 0.0


def test_paired_interval_is_tighter_than_unpaired_and_covers_the_difference() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 400)
    champion = np.where(rng.random(400) < 0.7, labels, rng.integers(0, 5, 400))
    # The challenger fixes a fifth of the champion's mistakes and changes nothing else.
    challenger = np.where(rng.random(400) < 0.2, labels, champion)
    paired = compare_kappa(labels * 5 + challenger, labels * 5 + champion, 5, SETTINGS)
    unpaired = compare_kappa(labels * 5 + challenger, labels * 5 + champion, 5, SETTINGS, paired=False)
    true = cohen_kappa_score(labels, challenger, weights="quadratic") - cohen_kappa_score(labels, champion,
                                                                                         weights="quadratic")
    assert paired.difference.value == pytest.approx(true)
    assert paired.difference.low < true < paired.difference.high
    assert paired.difference.low > 0  # a sure improvement on common images
    assert (paired.difference.high - paired.difference.low) < 0.5 * (unpaired.difference.high - unpaired.difference.low)
    # Seeded: the same figures again.
    assert compare_kappa(labels * 5 + challenger, labels * 5 + champion, 5, SETTINGS).difference == paired.difference


def test_dice_comparison_on_per_case_arrays() -> None:
    rng = np.random.default_rng(2)
    champion = rng.uniform(0.5, 0.9, 60)
    shifted = compare_dice(champion + 0.03, champion, SETTINGS)
    assert (shifted.difference.value, shifted.difference.low, shifted.difference.high) == pytest.approx((0.03,) * 3)
    noisy = compare_dice(champion + rng.normal(0.03, 0.05, 60), champion, SETTINGS)
    assert noisy.metric == "dice" and noisy.difference.low < 0.03 < noisy.difference.high
    assert noisy.challenger.value == pytest.approx(np.mean(champion) + noisy.difference.value)
    with pytest.raises(ValueError, match="same samples"):
        compare("dice", champion[:10], champion, lambda s, axis=-1: s.mean(axis), SETTINGS)


def test_records_pair_by_sample_and_refuse_other_samples() -> None:
    ids = pd.DataFrame({"sample": ["a.png", "b.png", "c.png"], "sha256": ["1", "2", "3"]})
    mine = classification_records(ids, [0, 1, 1], [0, 1, 0], "test", ["x", "y"])
    theirs = classification_records(ids.iloc[::-1].reset_index(drop=True), [1, 1, 0], [1, 1, 1], "test", ["x", "y"])
    aligned = theirs.aligned_to(mine)
    assert aligned.table["sample"].tolist() == ["a.png", "b.png", "c.png"]
    assert aligned.table["pred"].tolist() == [1, 1, 1] and aligned.digest() == mine.digest()
    relabelled = classification_records(ids, [1, 1, 1], [0, 1, 0], "test", ["x", "y"])
    with pytest.raises(RecordsError, match="different test samples"):
        relabelled.aligned_to(mine)


def _version(**tags: str) -> VersionInfo:
    return VersionInfo(name="m", version="2", run_id="r", source="", created_ms=0, aliases=(), tags=tags)


def _estimate(value: float, low: float, high: float) -> Estimate:
    return Estimate(value, low, high, 0.95)


@pytest.mark.parametrize(("rule", "low", "outcome"), [
    ("non_inferiority", -0.005, PROMOTED), ("non_inferiority", -0.02, REJECTED),
    ("superiority", 0.001, PROMOTED), ("superiority", -0.005, REJECTED),
])
def test_rule_reads_the_lower_bound(rule: str, low: float, outcome: str) -> None:
    settings = PromotionConfig(rule=rule, margin=0.01, floor=0.6)
    comparison = compare_dice(np.array([0.8, 0.8]), np.array([0.8, 0.8]), settings)
    comparison = type(comparison)(**{**comparison.__dict__, "difference": _estimate(0.01, low, 0.03)})
    decision = decide(_version(stand_in_weights="true"), "kappa", _estimate(0.8, 0.7, 0.9), comparison, settings)
    assert decision.outcome == outcome
    assert "STAND-IN" in decision.reason


def test_random_weights_never_pass_and_the_floor_holds_first() -> None:
    settings = PromotionConfig(floor=0.6)
    great = _estimate(0.99, 0.98, 1.0)
    assert decide(_version(random_weights="true"), "kappa", great, None, settings).outcome == REJECTED
    assert "RANDOM WEIGHTS" in decide(_version(random_weights="true"), "kappa", great, None, settings).reason
    assert decide(_version(), "kappa", _estimate(0.5, 0.4, 0.6), None, settings).outcome == REJECTED
    assert decide(_version(), "kappa", great, None, settings).outcome == PROMOTED


def test_promote_step_skips_when_nothing_was_registered(tmp_path) -> None:
    from dvpt_core.steps.promote import promote_step
    from tests.helpers import tiny_config

    (tmp_path / "registry").mkdir()
    (tmp_path / "registry/registered.json").write_text(json.dumps({"registered": False, "reason": "in dvc exp"}))
    result = promote_step(tiny_config(), tmp_path / "registry", tmp_path / "promotion")
    assert result["decision"] == "skipped" and "in dvc exp" in result["reason"]
    assert json.loads((tmp_path / "promotion/decision.json").read_text()) == result


# --- against a real MLflow server -----------------------------------------------------------------


def _register(registry_runs: dict, which: str, name: str) -> str:
    return register_run(registry_runs["cfg"], registry_runs[which], name, registry_runs["export"])


def _cfg(registry_runs: dict, name: str, *overrides: str):
    return with_overrides(registry_runs["cfg"], f"tracking.registered_model={name}", "promotion.resamples=500",
                          *overrides)


def _champion(name: str) -> str | None:
    info = version_by_alias(mlflow.MlflowClient(), name, "champion")
    return info.version if info else None


def test_better_challenger_promoted_worse_rejected_both_recorded(registry_runs: dict, capsys) -> None:
    name = "promo-better-worse"
    cfg = _cfg(registry_runs, name, "promotion.floor=-1.0")
    client = mlflow.MlflowClient()
    first = promote(cfg, _register(registry_runs, "bad", name))
    assert first["decision"] == PROMOTED and "first champion" in first["reason"] and _champion(name) == "1"

    better = promote(cfg, _register(registry_runs, "good", name))
    assert better["decision"] == PROMOTED and _champion(name) == "2"
    assert better["comparison"]["difference"]["low"] > 0 and better["comparison"]["paired"]

    # Registering a run again returns its version (registration is idempotent): the worse
    # challenger is the bad run's version 1, now measured against champion 2.
    assert _register(registry_runs, "bad", name) == "1"
    worse = promote(cfg, "1")
    assert worse["decision"] == REJECTED and _champion(name) == "2"
    assert worse["comparison"]["difference"]["high"] < 0

    v2, v3 = get_version(client, name, "2"), get_version(client, name, "1")
    assert v3.tags["promotion.decision"] == REJECTED and v3.tags["promotion.compared_with"] == "2"
    assert v2.tags["promotion.decision"] == PROMOTED and v2.tags["champion.previous"] == "1"
    assert [e["action"] for e in events(v2)] == [PROMOTED, "kept"]
    assert "**rejected**" in v3.description and "STAND-IN" in v3.description
    run = client.get_run(worse["run_id"])
    assert run.data.tags["decision"] == REJECTED and run.data.metrics["difference"] == pytest.approx(
        worse["comparison"]["difference"]["value"])
    artifacts = {a.path for a in client.list_artifacts(worse["run_id"])}
    assert {"decision.json", "bootstrap.png"} <= artifacts

    table = registry_rows(cfg)
    # Version 1's latest decision is the rejection against champion 2.
    assert [(r["version"], r["decision"]) for r in table["versions"]] == [("2", PROMOTED), ("1", REJECTED)]
    assert "@champion" in registry_text(table)
    capsys.readouterr()  # what MLflow printed so far
    assert main(["registry", "--set", f"tracking.tracking_uri={cfg.tracking.tracking_uri}",
                 "--set", f"tracking.registered_model={name}"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == name and "@champion" in printed and "lower bound not above" in printed


def test_first_version_below_the_floor_is_not_champion(registry_runs: dict) -> None:
    name = "promo-floor"
    result = promote(_cfg(registry_runs, name), _register(registry_runs, "bad", name))
    assert result["decision"] == REJECTED and "below the floor 0.6" in result["reason"]
    assert _champion(name) is None


def test_challenger_on_other_test_data_is_refused_naming_both(registry_runs: dict) -> None:
    name = "promo-other-data"
    cfg = _cfg(registry_runs, name)
    promote(cfg, _register(registry_runs, "good", name))
    with pytest.raises(PromotionRefused, match=r"version 2 with champion promo-other-data version 1.*ffffffff"):
        promote(cfg, _register(registry_runs, "other_data", name))
    with pytest.raises(PromotionRefused, match="test samples: the two evaluations scored different test samples"):
        promote(cfg, _register(registry_runs, "other_split", name))
    assert _champion(name) == "1"
    refused = get_version(mlflow.MlflowClient(), name, "2")
    assert refused.tags["promotion.decision"] == REFUSED and "DVC hash" in refused.tags["promotion.reason"]

    unpaired = promote(with_overrides(cfg, "promotion.allow_different_data=true"), "2")
    assert unpaired["decision"] == REJECTED and unpaired["comparison"]["paired"] is False


def test_rollback_restores_the_previous_champion(registry_runs: dict) -> None:
    name = "promo-rollback"
    cfg = _cfg(registry_runs, name, "promotion.floor=-1.0")
    promote(cfg, _register(registry_runs, "bad", name))
    promote(cfg, _register(registry_runs, "good", name))
    assert _champion(name) == "2"

    result = rollback(cfg, "drift alarm on site B")
    assert (result["from_version"], result["to_version"], _champion(name)) == ("2", "1", "1")
    client = mlflow.MlflowClient()
    restored, rolled = get_version(client, name, "1"), get_version(client, name, "2")
    assert events(rolled)[-1]["action"] == "rolled_back" and events(rolled)[-1]["why"] == "drift alarm on site B"
    assert events(restored)[-1]["action"] == "restored" and events(restored)[-1]["by"]
    assert "drift alarm on site B" in restored.description
    with pytest.raises(RegistryError, match="first champion"):
        rollback(cfg, "again")
    # The command line says so too, and exits 2.
    assert main(["rollback", "--why", "again", "--set", f"tracking.tracking_uri={cfg.tracking.tracking_uri}",
                 "--set", f"tracking.registered_model={name}"]) == 2


def test_two_promotions_racing_leave_exactly_one_champion(registry_runs: dict) -> None:
    name = "promo-race"
    cfg = _cfg(registry_runs, name, "promotion.floor=-1.0")
    promote(cfg, _register(registry_runs, "bad", name))
    racers = [_register(registry_runs, "good", name), _register(registry_runs, "good_again", name)]
    start = threading.Barrier(len(racers))
    outcomes: dict[str, str] = {}

    def race(version: str) -> None:
        start.wait()
        try:
            outcomes[version] = promote(cfg, version)["decision"]
        except PromotionRefused as err:
            outcomes[version] = f"{REFUSED}: {err}"

    threads = [threading.Thread(target=race, args=(v,)) for v in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    winners = [v for v, outcome in outcomes.items() if outcome == PROMOTED]
    (loser,) = set(racers) - set(winners)
    assert len(winners) == 1 and _champion(name) == winners[0]
    assert outcomes[loser].startswith(REFUSED) and "moved from version 1" in outcomes[loser]
    client = mlflow.MlflowClient()
    assert get_version(client, name, loser).tags["promotion.decision"] == REFUSED
    assert get_version(client, name, winners[0]).tags["champion.previous"] == "1"
    assert client.search_registered_models(f"name = '{name}.promotion-lock'") == []


def test_model_card_names_data_hash_commit_and_stand_in(registry_runs: dict) -> None:
    name = "promo-card"
    version = _register(registry_runs, "good", name)
    client = mlflow.MlflowClient()
    info = get_version(client, name, version)
    card = info.description
    assert info.data_hash in card and info.tags["git_commit"] in card
    assert info.tags["backbone_fingerprint"] in card and "STAND-IN WEIGHTS" in card
    assert "| kappa | 1.0000 |" in card and "bootstrap interval" in card
    local = mlflow.artifacts.download_artifacts(run_id=info.run_id, artifact_path=f"model_card/version-{version}.md")
    assert Path(local).read_text() == card
    assert json.loads(Path(registry_runs["good"] / "evaluation/test_samples.json").read_text())["metric"] == "kappa"
