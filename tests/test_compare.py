"""The method comparison: cell configurations, the aggregation into the report, the compiled
fan-out / fan-in pipeline, and a whole local run against a real MLflow server."""

from __future__ import annotations

import builtins
import json
import statistics
from pathlib import Path

import mlflow
import pytest
import yaml

from components.compare import cell_config as cell_component
from dvpt_core.config import ConfigError, ExperimentConfig, KubeflowConfig
from dvpt_core.data.synthetic.ddr import generate_ddr
from dvpt_core.steps.compare import (
    cell_config, cell_table, expand_grid, rank, report_html, scores, summarise, table,
)
from pipelines.compare_pipeline import compile_compare, run_compare_local
from tests.helpers import tiny_config


def _row(method: str, seed: int, ratio: float, kappa: float, accuracy: float, trainable: int) -> dict:
    return {"run_id": f"{method}-{seed}-{ratio}", "method": method, "seed": seed, "label_ratio": ratio,
            "trainable": trainable, "random_weights": False, "kappa": kappa, "accuracy": accuracy}


METRICS = ("kappa", "accuracy")
ROWS = [
    _row("dvpt", 0, 0.5, 0.60, 0.50, 1000), _row("dvpt", 1, 0.5, 0.70, 0.60, 1000),
    _row("dvpt", 0, 1.0, 0.80, 0.70, 1000), _row("dvpt", 1, 1.0, 0.90, 0.80, 1000),
    _row("linear", 0, 0.5, 0.40, 0.45, 10), _row("linear", 1, 0.5, 0.40, 0.55, 10),
    _row("linear", 0, 1.0, 0.95, 0.90, 10), _row("linear", 1, 1.0, 0.85, 0.80, 10),
]


def test_expand_grid_and_cell_config_set_method_seed_ratio_and_method_overrides() -> None:
    grid = expand_grid(["linear", "full"], [0, 1], [0.1, 1.0], {"full": ["train.lr=0.0003"]})
    assert len(grid) == 8
    full = next(c for c in grid if c["method"] == "full" and c["seed"] == 1 and c["label_ratio"] == 0.1)
    cfg = cell_config(tiny_config(), full)
    assert (cfg.model.method, cfg.train.seed, cfg.data.label_seed, cfg.data.label_ratio, cfg.train.lr) == (
        "full", 1, 1, 0.1, 0.0003)
    # The splits stay the configuration's: every cell is scored on the same test samples.
    assert cfg.data.split_seed == tiny_config().data.split_seed
    linear = cell_config(tiny_config(), grid[0])
    assert linear.train.lr == tiny_config().train.lr  # another method's override does not leak
    with pytest.raises(ConfigError, match="model.method"):
        cell_config(tiny_config(), {"method": "nope", "seed": 0, "label_ratio": 1.0})
    # The pipeline's component: the run's epochs and learning rate, then the cell (whose own
    # overrides win).
    run = ExperimentConfig.from_json(cell_component(tiny_config().to_json(), full, epochs=7, learning_rate=0.5))
    assert (run.train.epochs, run.train.lr, run.model.method) == (7, 0.0003, "full")
    assert ExperimentConfig.from_json(cell_component(tiny_config().to_json(), grid[0], 7, 0.5)).train.lr == 0.5


def test_summary_is_mean_and_sample_std_per_method_and_ratio_and_ranks_by_mean_kappa() -> None:
    summary = summarise(ROWS, METRICS)
    assert [(e["method"], e["label_ratio"], e["n"]) for e in summary] == [
        ("dvpt", 0.5, 2), ("dvpt", 1.0, 2), ("linear", 0.5, 2), ("linear", 1.0, 2)]
    dvpt_half = summary[0]
    assert dvpt_half["kappa_mean"] == pytest.approx(0.65)
    assert dvpt_half["kappa_std"] == pytest.approx(statistics.stdev([0.6, 0.7]))
    assert dvpt_half["accuracy_mean"] == pytest.approx(0.55)
    assert summary[2]["kappa_std"] == 0.0
    # dvpt: (0.65 + 0.85) / 2 = 0.75 beats linear: (0.40 + 0.90) / 2 = 0.65, though linear wins at 100%.
    ranking = rank(summary, "kappa")
    assert [(r["rank"], r["method"]) for r in ranking] == [(1, "dvpt"), (2, "linear")]
    assert ranking[1]["kappa_at_max_ratio"] == pytest.approx(0.90)
    assert scores(summary, METRICS)["linear_r1_kappa_mean"] == pytest.approx(0.90)

    header, rows = table(summary, ranking, METRICS)
    assert header == ["rank", "method", "trainable", "kappa @ 50%", "kappa @ 100%", "accuracy @ 50%",
                      "accuracy @ 100%"]
    assert rows[0] == ["1", "dvpt", "1,000", "0.650 ± 0.071", "0.850 ± 0.071", "0.550 ± 0.071", "0.750 ± 0.071"]


def test_report_page_holds_both_tables_and_the_plot(tmp_path) -> None:
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG fake")
    summary = summarise(ROWS, METRICS)
    page = report_html("a <title>", ["a note"], [("Per method", table(summary, rank(summary, "kappa"), METRICS)),
                                                 ("Per cell", cell_table(ROWS, METRICS))], png)
    assert "a &lt;title&gt;" in page and "<p>a note</p>" in page
    assert page.count("<table>") == 2
    assert page.count("<tr>") == 1 + 2 + 1 + len(ROWS)
    assert "<td>0.650 ± 0.071</td>" in page and "<td>linear-1-1.0</td>" in page
    assert "data:image/png;base64," in page


def test_compiled_pipeline_preprocesses_once_fans_out_boundedly_over_the_grid_and_fans_in(tmp_path) -> None:
    cfg = tiny_config("tracking.tracking_uri=http://mlflow.mlflow.svc.cluster.local:5000")
    grid = expand_grid(["linear", "dvpt"], [0, 1], [0.5, 1.0])
    settings = KubeflowConfig(parallelism=3, gpus=1, data_repo="https://git.example.com/ddr.git")
    path = compile_compare(tmp_path / "compare.yaml", cfg, grid, "reg/dvpt:2", settings)
    spec, platform = yaml.safe_load_all(path.read_text())

    root = spec["root"]
    data = {"resolve-data": set(), "fetch-data": {"resolve-data"}, "validate": {"fetch-data"},
            "preprocess": {"fetch-data", "validate"}}
    assert {name: set(t.get("dependentTasks", [])) for name, t in root["dag"]["tasks"].items()} == {
        **data, "pretrain": set(), "for-loop-1": {"fetch-data", "preprocess", "pretrain", "validate"},
        "compare": {"for-loop-1"}}
    loop_task = root["dag"]["tasks"]["for-loop-1"]
    assert loop_task["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--grid"
    assert loop_task["iteratorPolicy"] == {"parallelismLimit": 3}
    parameters = root["inputDefinitions"]["parameters"]
    assert parameters["grid"]["defaultValue"] == json.loads(json.dumps(grid))
    assert {name: parameters[name]["defaultValue"] for name in ("epochs", "learning_rate")} == {
        "epochs": cfg.train.epochs, "learning_rate": cfg.train.lr}
    shipped = json.loads(parameters["config_json"]["defaultValue"])
    assert shipped["tracking"]["tracking_uri"] is None
    assert shipped == json.loads(cfg.model_copy(update={"tracking": cfg.tracking.model_copy(
        update={"tracking_uri": None})}).to_json())
    # One preprocessed cache, outside the loop, serves every cell: a cell only configures, trains
    # (taking its labelled subset) and evaluates.
    loop = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert {name: set(t.get("dependentTasks", [])) for name, t in loop.items()} == {
        "cell-config": set(), "train": {"cell-config"}, "evaluate": {"cell-config", "train"}}
    assert loop["train"]["inputs"]["artifacts"]["cache"]["componentInputArtifact"] == (
        "pipelinechannel--preprocess-cache")
    every_task = [*root["dag"]["tasks"].values(), *loop.values()]
    assert sorted(t["componentRef"]["name"] for t in every_task if t.get("cachingOptions", {}).get("enableCache")) == [
        "comp-cell-config", "comp-fetch-data", "comp-preprocess", "comp-pretrain", "comp-validate"]
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {"reg/dvpt:2"}
    assert spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"][
        "resourceCount"] == "1"
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {name for name, e in executors.items() if "configMapAsEnv" in e} == {
        "exec-train", "exec-evaluate", "exec-compare"}
    assert "tolerations" in executors["exec-train"]


def test_cli_compile_compare_checks_every_cell_before_compiling(tmp_path, capsys) -> None:
    from dvpt_core.cli import main

    out = tmp_path / "c.yaml"
    args = ["kfp", "compile-compare", "--out", str(out), "--methods", "linear", "full", "--seeds", "3",
            "--label-ratios", "0.2", "--method-set", "full:train.lr=0.0003"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["cells"] == 2
    grid = next(yaml.safe_load_all(out.read_text()))["root"]["inputDefinitions"]["parameters"]["grid"]["defaultValue"]
    assert [(c["method"], c["overrides"]) for c in grid] == [("linear", []), ("full", ["train.lr=0.0003"])]
    assert main([*args[:-1], "full:train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err
    assert main([*args[:-2], "--method-set", "dvpt:train.lr=1"]) == 2


@pytest.mark.slow
def test_local_comparison_reports_every_cell_and_logs_the_report(tmp_path, mlflow_server) -> None:
    cfg = tiny_config(f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=compare-tests")
    data = tmp_path / "data"
    generate_ddr(data, cfg.synthetic, cfg.data.class_names)
    grid = expand_grid(["linear", "dvpt"], [0], [0.5, 1.0])

    print_before = builtins.print
    result = run_compare_local(cfg, grid, data, tmp_path / "kfp")

    # Cells ran in parallel threads, whose kfp log indentation swaps builtins.print: it is restored.
    assert builtins.print is print_before
    assert result["cells"] == 4 and result["random_weights"] is True
    assert {r["method"] for r in result["ranking"]} == {"linear", "dvpt"}
    page = Path(result["report"]).read_text()
    client = mlflow.MlflowClient(mlflow_server)
    children = client.search_runs([client.get_experiment_by_name("compare-tests").experiment_id],
                                  f"tags.mlflow.parentRunId = '{result['run_id']}'")
    assert sorted((r.data.params["model.method"], float(r.data.params["data.label_ratio"])) for r in children) == [
        ("dvpt", 0.5), ("dvpt", 1.0), ("linear", 0.5), ("linear", 1.0)]
    for run in children:  # one row per cell in the page, naming its run
        assert f"<td>{run.info.run_id}</td>" in page
        assert run.data.params["train.seed"] == "0" and "test_kappa" in run.data.metrics
    assert "RANDOM WEIGHTS" in page and "data:image/png;base64," in page
    parent = client.get_run(result["run_id"])
    assert parent.info.run_name == "comparison"
    assert "linear_r0.5_kappa_mean" in parent.data.metrics
    assert {a.path for a in client.list_artifacts(result["run_id"])} >= {"report.html", "comparison.json",
                                                                         "comparison.png", "comparison.md"}
