"""Mutation testing of the core (issue 12) with Cosmic Ray, one module at a time.

    python mutation/run.py [--module PATH ...] [--sample FRACTION] [--retest-survivors] [--report-only]

For each module (default: every module in ``mutation/targets.toml``) this

1. copies the working tree (tracked and untracked, not ignored, files) to ``.mutation/tree``, so
   mutants are written there and a killed run never leaves a mutated file in the repository;
2. starts the pytest fork server (``forkserver.py``) in that copy;
3. runs the module's fast tests once unmutated (they must pass; their time sets the timeout);
4. has Cosmic Ray create every mutant (``cosmic-ray init``), skip the excluded operators
   (``cr-filter-operators``) and test each one (``cosmic-ray exec``) with
   ``pytest -x -m "not slow"`` on the module's tests only;
5. writes ``mutation/results/<module>.json`` and regenerates ``mutation/REPORT.md``
   (``report.py``), which sets aside the survivors listed in ``mutation/equivalent.toml``.

``--sample FRACTION`` tests a seeded random sample of the module's mutants (the same sample on every
machine: the generator is seeded with the module's path), for a module whose every mutant would
take hours; the report marks the rate as a sample's and gives its 95% interval.
``--retest-survivors`` re-tests only what ``mutation/results`` does not record as killed (after
tests were added): it starts a fresh session and carries over the stored killed mutants whose
source line is unchanged, wherever the line has moved; a module stored as a sample re-tests the
survivors of that same sample (run a fresh sample after changing the module). ``--report-only`` rewrites the report from
the stored results.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
import tomllib
from datetime import datetime, timezone
from pathlib import Path

import report
from forkserver import wait_ready

log = logging.getLogger("mutation")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = REPO / ".mutation"
TREE = WORK / "tree"
SOCKET = WORK / "server.sock"
TARGETS = HERE / "targets.toml"
RESULTS = HERE / "results"
# Plain asserts: a mutant only needs pass or fail, and rewriting the test modules costs seconds.
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", "--no-header", "-W", "ignore", "--assert=plain"]
SERVER_START_S = 300
# A mutant's tests may run this many times longer than the unmutated tests before it counts as
# killed by timeout (an endless loop), plus a fixed allowance for a loaded machine.
TIMEOUT_FACTOR, TIMEOUT_SLACK_S = 4.0, 60.0
NOT_SAMPLED = "not in the sample"


def load_targets() -> dict:
    return tomllib.loads(TARGETS.read_text())


def copy_tree() -> None:
    """The repository's files as git sees them (tracked and new, not ignored), without .git."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    shutil.rmtree(TREE, ignore_errors=True)
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = TREE / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(TREE), PYTHONDONTWRITEBYTECODE="1", DVC_NO_ANALYTICS="1",
               GX_ANALYTICS_ENABLED="false", MPLBACKEND="Agg",
               # The installed pytest plugins (anyio, hydra, platformdirs) serve no test here and
               # take seconds to load per mutant.
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def test_command(args: list[str]) -> str:
    client = [sys.executable, "-B", str(TREE / "mutation" / "forkserver.py"), "client", str(SOCKET), "--"]
    return subprocess.list2cmdline([*client, *PYTEST_ARGS, *args])


def cosmic_ray_config(module: str, command: str, timeout_s: float, exclude: list[str]) -> str:
    return "\n".join([
        "[cosmic-ray]",
        f"module-path = {json.dumps(module)}",
        f"timeout = {timeout_s:.0f}",
        "excluded-modules = []",
        f"test-command = {json.dumps(command)}",
        "",
        "[cosmic-ray.distributor]",
        'name = "local"',
        "",
        "[cosmic-ray.filters.operators-filter]",
        f"exclude-operators = {json.dumps(exclude)}",
        "",
    ])


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_module(module: str, targets: dict, retest: bool, sample: float | None = None) -> None:
    entry = targets["modules"].get(module)
    if entry is None:
        raise SystemExit(f"{module} is not in {TARGETS.relative_to(REPO)}; known: {', '.join(targets['modules'])}")
    slug = module.replace("/", ".")
    session = WORK / f"{slug}.sqlite"
    config = WORK / f"{slug}.toml"
    copy_tree()
    env = environment()
    # A killed run leaves its socket behind; wait_ready would take it for the new server's.
    SOCKET.unlink(missing_ok=True)
    with (WORK / "server.log").open("a") as server_log:
        server = subprocess.Popen([sys.executable, "-B", str(TREE / "mutation" / "forkserver.py"), "serve", str(SOCKET)],
                                  cwd=TREE, env=env, stdout=server_log, stderr=subprocess.STDOUT)
    try:
        wait_ready(SOCKET, server, SERVER_START_S)
        command = test_command(entry["args"])
        started = time.monotonic()
        baseline = subprocess.run(command, shell=True, cwd=TREE, env=env, capture_output=True, text=True)
        baseline_s = time.monotonic() - started
        if baseline.returncode != 0:
            log.error("%s skipped: its tests fail before any mutation:\n%s", module,
                      (baseline.stdout + baseline.stderr)[-4000:])
            return
        timeout_s = TIMEOUT_FACTOR * baseline_s + TIMEOUT_SLACK_S
        config.write_text(cosmic_ray_config(module, command, timeout_s, targets["operators"]["exclude"]))
        log.info("%s: tests pass unmutated in %.1f s; mutant timeout %.0f s", module, baseline_s, timeout_s)
        subprocess.run([tool("cosmic-ray"), "init", str(config), str(session), "--force"], cwd=TREE, env=env, check=True)
        subprocess.run([tool("cr-filter-operators"), str(session), str(config)], cwd=TREE, env=env, check=True)
        path = RESULTS / f"{slug}.json"
        stored = json.loads(path.read_text()) if retest and path.is_file() else None
        if sample is not None and not (stored and stored.get("not_sampled")):
            log.info("%s: %d mutants left out of the %.0f%% sample", module, leave_out_of_sample(module, session, sample),
                     100 * sample)
        if stored:
            seeded, left_out = seed_from_results(module, session, stored)
            log.info("%s: %d mutants killed in the stored results are not re-tested; %d outside the stored sample "
                     "are left out", module, seeded, left_out)
        started = time.monotonic()
        subprocess.run([tool("cosmic-ray"), "exec", str(config), str(session)], cwd=TREE, env=env, check=True)
        elapsed = time.monotonic() - started
        save_results(module, session, entry["args"], baseline_s, elapsed)
    finally:
        server.kill()
        server.wait()
        SOCKET.unlink(missing_ok=True)


def leave_out_of_sample(module: str, session: Path, fraction: float) -> int:
    """Mark all but a seeded random ``fraction`` of the untested mutants as skipped."""
    with sqlite3.connect(session) as db:
        # In source order (job ids are random per session): the same module gives the same sample.
        jobs = [row[0] for row in db.execute(
            "SELECT s.job_id FROM mutation_specs s LEFT JOIN work_results r ON s.job_id = r.job_id "
            "WHERE r.job_id IS NULL ORDER BY s.start_pos_row, s.start_pos_col, s.operator_name, s.occurrence")]
        kept = set(random.Random(module).sample(jobs, round(fraction * len(jobs))))
        left_out = [job for job in jobs if job not in kept]
        db.executemany("INSERT INTO work_results (job_id, worker_outcome, output, test_outcome, diff) "
                       "VALUES (?, 'SKIPPED', ?, NULL, NULL)", [(job, NOT_SAMPLED) for job in left_out])
    return len(left_out)


def seed_from_results(module: str, session: Path, stored: dict) -> tuple[int, int]:
    """Give the fresh session the stored results' killed and timed-out mutants (``mutation/results``
    is versioned; Cosmic Ray's sessions in ``.mutation/`` are not, and may be older than the module).

    A stored mutant is matched when the session has the same operator at the same column of a
    source line that still reads as it did, wherever that line has moved (the n-th such mutant to
    the n-th, in order); a mutant on a changed line is tested again. When the stored run was a
    sample, every mutant that matches none of the stored ones is left out, so the survivors of the
    same sample are re-tested. Returns (carried over, left out).
    """
    keep_sample = stored.get("not_sampled", 0) > 0  # results written before sampling existed lack it
    lines = (TREE / module).read_text().splitlines()
    tested: dict[tuple[str, int], list[dict]] = {}
    for m in sorted(stored["mutants"], key=lambda m: m["occurrence"]):
        tested.setdefault(("core/" + m["operator"], m["column"]), []).append(m)
    seeded = left_out = 0
    with sqlite3.connect(session) as db:
        specs = db.execute("SELECT s.job_id, s.operator_name, s.start_pos_row, s.start_pos_col "
                           "FROM mutation_specs s LEFT JOIN work_results r ON s.job_id = r.job_id "
                           "WHERE r.job_id IS NULL ORDER BY s.occurrence").fetchall()
        for job_id, operator, row, col in specs:
            # "original" is the changed lines joined by " / " (a statement can span lines).
            line = lines[row - 1].strip()
            same = tested.get((operator, col), [])
            stored = next((m for m in same if m["original"] == line or m["original"].startswith(line + " / ")), None)
            if stored is None:
                if keep_sample:
                    db.execute("INSERT INTO work_results (job_id, worker_outcome, output, test_outcome, diff) "
                               "VALUES (?, 'SKIPPED', ?, NULL, NULL)", (job_id, NOT_SAMPLED))
                    left_out += 1
                continue
            same.remove(stored)
            if stored["outcome"] not in ("killed", "timeout"):
                continue
            # The diff as changed_lines() reads it back, so the report shows the same lines.
            diff = "\n".join(f"-{line}" for line in stored["original"].split(" / ")) + "\n" + "\n".join(
                f"+{line}" for line in filter(None, stored["mutant"].split(" / ")))
            db.execute("INSERT INTO work_results (job_id, worker_outcome, output, test_outcome, diff) "
                       "VALUES (?, 'NORMAL', ?, 'KILLED', ?)",
                       (job_id, "timeout" if stored["outcome"] == "timeout" else "carried over from the stored results", diff))
            seeded += 1
    return seeded, left_out


def save_results(module: str, session: Path, args: list[str], baseline_s: float, elapsed_s: float) -> None:
    lines = (TREE / module).read_text().splitlines()
    with sqlite3.connect(session) as db:
        rows = db.execute(
            "SELECT s.operator_name, s.occurrence, s.start_pos_row, s.start_pos_col, s.definition_name, "
            "r.worker_outcome, r.test_outcome, r.output, r.diff "
            "FROM mutation_specs s JOIN work_results r ON s.job_id = r.job_id "
            "ORDER BY s.start_pos_row, s.start_pos_col, s.operator_name, s.occurrence"
        ).fetchall()
    mutants, skipped, not_sampled = [], 0, 0
    for operator, occurrence, row, col, definition, worker, test, output, diff in rows:
        if worker == "SKIPPED":
            if output == NOT_SAMPLED:
                not_sampled += 1
            else:
                skipped += 1
            continue
        original, mutant = changed_lines(diff or "", lines[row - 1])
        outcome = (test or worker).lower()
        if outcome == "killed" and (output or "").strip() == "timeout":
            outcome = "timeout"
        mutants.append({"line": row, "column": col, "operator": operator.removeprefix("core/"),
                        "occurrence": occurrence, "definition": definition,
                        "original": original, "mutant": mutant, "outcome": outcome})
    RESULTS.mkdir(exist_ok=True)
    result = {
        "module": module, "tests": args, "pytest": PYTEST_ARGS,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git_describe(), "source_sha256": report.source_digest(TREE / module),
        "baseline_s": round(baseline_s, 1), "run_s": round(elapsed_s),
        "excluded_by_operator": skipped, "not_sampled": not_sampled, "mutants": mutants,
    }
    path = RESULTS / f"{module.replace('/', '.')}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def changed_lines(diff: str, fallback: str) -> tuple[str, str]:
    """The original and mutated source lines of a unified diff (stripped; a deletion gives "")."""
    removed = [line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return " / ".join(removed) or fallback.strip(), " / ".join(added)


def git_describe() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return head + ("+uncommitted" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", help="a module path from mutation/targets.toml (repeatable)")
    parser.add_argument("--sample", type=float, metavar="FRACTION",
                        help="test a seeded random sample of each module's mutants (0 < FRACTION <= 1)")
    parser.add_argument("--retest-survivors", action="store_true", help="re-test only the last session's survivors")
    parser.add_argument("--report-only", action="store_true", help="only rewrite mutation/REPORT.md")
    args = parser.parse_args(argv)
    if args.sample is not None and not 0 < args.sample <= 1:
        parser.error(f"--sample {args.sample}: give a fraction above 0 and at most 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    targets = load_targets()
    if not args.report_only:
        WORK.mkdir(exist_ok=True)
        with (WORK / "lock").open("w") as lock:
            try:  # one run at a time: runs share the tree copy and the server socket
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SystemExit(f"another mutation run holds {WORK / 'lock'}") from None
            for module in args.module or list(targets["modules"]):
                run_module(module, targets, args.retest_survivors, args.sample)
                report.write_report(targets)
    report.write_report(targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
