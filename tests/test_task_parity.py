"""A binary project gives the same model bytes, decisions and figures as before the task object (issue 22): the
default project's path from its files to the gate, run in-process as the stages run it, against the figures recorded
from main before `lifecycle.tasks` existed (tests/binary_parity.json)."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lifecycle.collect import collect
from lifecycle.core import load_settings, parse_mapping, write_parquet_files
from lifecycle.evaluate import EvaluateOptions, evaluate_model
from lifecycle.files import sha256_bytes
from lifecycle.metrics import sensitive_grouping
from lifecycle.prepare import assign_splits, prepare
from lifecycle.registry import model_bytes
from lifecycle.tasks import BinaryTask, task_for
from lifecycle.train import feature_columns, fit_model, reference_statistics, row_weights

RECORDED = json.loads((Path(__file__).parent / "binary_parity.json").read_text())
MODELS = ("logistic_regression", "hist_gradient_boosting")  # the candidate evaluated, and the champion beside it


def prepared(project: Path) -> tuple:
    "The default project's clean rows as the train and evaluate stages read them (through the parquet file), its task."
    settings = load_settings(project / "settings.ini")
    section = settings.stage_section("prepare")
    snapshot, _, manifest = collect(settings)
    rules = [parse_mapping(section[key]) for key in ("recode", "missing_values", "ranges")]
    result = prepare(snapshot, settings, manifest["version"], *rules)
    clean = result["clean"].assign(_split=assign_splits(result["clean"], "stratified", 0.2, 0.2, 42))
    write_parquet_files({project / "clean.parquet": clean})  # stages exchange it as a file: its dtypes are the file's
    return settings, result, pd.read_parquet(project / "clean.parquet")


def evaluation_figures(evaluation: dict) -> dict:
    "What the evaluate stage records and decides, without the CPU time of scoring (the machine's, not the model's)."
    return {
        "threshold": evaluation["threshold"],
        "metrics": evaluation["metrics"],
        "intervals": evaluation["intervals"],
        "fairness": {
            column: {k: v for k, v in gaps.items() if k != "groups"} for column, gaps in evaluation["fairness"].items()
        },
        "champion_metrics": evaluation["champion_metrics"],
        "versus_champion": evaluation["versus_champion"],
        "by_source": evaluation["by_source"],
        "passed": evaluation["gate"]["passed"],
        "reasons": evaluation["gate"]["reasons"],
        "checks": [
            [check["check"], check["value"], check["passed"]]
            for check in evaluation["gate"]["checks"]
            if "latency" not in check["check"]
        ],
    }


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    "The default project prepared, both candidates fitted, the first evaluated against the second as champion."
    from conftest import copy_default_project

    project = copy_default_project(tmp_path_factory.mktemp("parity"))
    settings, result, clean = prepared(project)
    numeric, categorical = feature_columns(result["schema"], settings)
    train = clean[clean["_split"] == "train"]
    fitted = {
        model: fit_model(train, numeric, categorical, model, 42, False, 5, row_weights(train["_source"], ""))
        for model in MODELS
    }
    pipeline, cv, train_scores = fitted[MODELS[0]]
    grouping = sensitive_grouping(train, settings, 4)
    reference = reference_statistics(train, numeric, categorical, train_scores, train["_label"].to_numpy(), grouping)
    meta = {"features": {"numeric": numeric, "categorical": categorical}, "cv": cv}
    candidate = {"model": pipeline, "meta": meta, "trained": None, "reference": reference}
    champion = {"model": fitted[MODELS[1]][0], "meta": {**meta, "threshold": 0.4}, "trained": None}
    task = task_for(settings, clean["_label"])  # as the evaluate stage asks it
    evaluation = evaluate_model(
        candidate, clean, settings.sensitive, EvaluateOptions(bootstrap_resamples=50, fairness_seeds=1), champion, task
    )
    yield {"result": result, "clean": clean, "fitted": fitted, "evaluation": evaluation, "task": task}
    shutil.rmtree(project, ignore_errors=True)


def test_the_default_project_is_binary_and_says_why(parity):
    task = parity["result"]["task"]
    assert isinstance(task, BinaryTask) and isinstance(parity["task"], BinaryTask)
    assert task.sentence() == (
        "task: binary (inferred: [data] positive is set, so the target `num` has 2 values after mapping its 5 values "
        "to positive and negative)"
    )
    rows = parity["clean"]["_split"].value_counts().sort_index()
    assert {split: int(count) for split, count in rows.items()} == RECORDED["rows"]


def test_each_candidate_has_the_same_model_bytes_as_before(parity):
    from threadpoolctl import threadpool_info

    kernels = {pool.get("architecture") for pool in threadpool_info() if pool.get("internal_api") == "openblas"}
    assert kernels <= {"Haswell"}, f"recorded with OpenBLAS's Haswell kernels; this process has {kernels}"
    for model in MODELS:
        pipeline, cv, _ = parity["fitted"][model]
        assert sha256_bytes(model_bytes(pipeline)) == RECORDED[model]["sha256"], model
        assert cv["roc_auc_folds"] == RECORDED[model]["cv"], model


def test_the_evaluation_and_the_gate_decide_the_same_as_before(parity):
    figures = json.loads(json.dumps(evaluation_figures(parity["evaluation"])))  # tuples as lists, as recorded
    assert figures == RECORDED["evaluation"]
