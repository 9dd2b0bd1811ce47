"Train and evaluate: tracked, reproducible, registered models, and a gate that refuses worse or unfair ones."

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import HEART, REPO, run_lifecycle, stages


def _models(project):
    _, listing, _, _ = run_lifecycle("models", "--settings", project / "settings.ini", "--json", check=0)
    return listing


def test_default_project_reaches_an_approved_reproducible_champion(champion_project):
    heart_project = champion_project
    settings = heart_project / "settings.ini"
    run = json.loads((heart_project / "first-run.json").read_text())
    train, evaluate = stages(run)["train"]["summary"], stages(run)["evaluate"]["summary"]
    assert (evaluate["gate"]["passed"], evaluate["gate"]["reasons"]) == (True, [])
    assert (
        all(check["passed"] for check in evaluate["gate"]["checks"]) and len(evaluate["gate"]["checks"]) == 4
    )  # AUC, sex, age, latency
    assert evaluate["metrics"]["roc_auc"] > 0.8
    assert set(evaluate["fairness"]) == {"sex", "age", "sex & age"}
    version = train["model_version"]
    listing = _models(heart_project)
    assert listing["aliases"] == {"challenger": version, "champion": version}
    registered = next(v for v in listing["versions"] if v["version"] == version)
    assert registered["sha256"] == train["model_sha256"] and evaluate["model_version"] == version
    # The file on disk is the one recorded.
    import hashlib

    model_file = heart_project / "registry" / "versions" / str(version) / "model.skops"
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == train["model_sha256"]
    card = (heart_project / "registry" / "versions" / str(version) / "card.md").read_text()
    assert (
        "## Intended use" in card
        and "### By sex" in card
        and "## Caveats and recommendations" in card
        and "- Decision: passed" in card
    )
    assert (
        "## Gate criteria" in card
        and "## Ethical considerations" in card
        and "- Licence of the data it learned from: CC BY 4.0" in card
    )
    # Same data, settings and seed: the same model, byte for byte (train alone again: no later stage makes a model).
    _, again, _, _ = run_lifecycle(
        "run",
        "--settings",
        settings,
        "-p",
        "prepare.profile=false",
        "--from",
        "train",
        "--stages",
        "train",
        "--json",
        check=0,
    )
    assert [(stage["name"], stage["status"]) for stage in again["stages"]] == [
        ("collect", "cached"),
        ("prepare", "cached"),
        ("train", "ran"),
    ]
    retrained = stages(again)["train"]["summary"]
    assert retrained["model_version"] == version + 1
    assert retrained["model_sha256"] == train["model_sha256"]
    # W&B's offline files hold the logged metrics.
    from lifecycle.tracking import read_offline_run

    tracked = read_offline_run(train["wandb_run"])
    wandb_folder = Path(train["wandb_run"]).parent
    assert (
        wandb_folder.name == "wandb" and (wandb_folder.parent / "settings.ini").exists()
    )  # in the project, not the home folder
    assert (
        tracked["config"]["seed"] == 42
        and tracked["config"]["data_version"] == stages(run)["prepare"]["summary"]["data_version"]
    )
    assert round(tracked["summary"]["val/roc_auc"], 4) == train["metrics"]["val_roc_auc"]
    assert tracked["summary"]["model_sha256"] == train["model_sha256"]
    # One lifecycle run is one W&B group, one run a stage, named after the run id; evaluate uses the model train logged.
    assert tracked["name"] == f"{run['run_id']}-train" and train["wandb"]["mode"] == "offline"
    assert train["wandb"]["sync"].startswith("wandb sync wandb/offline-run-")
    assert (wandb_folder.parent / train["wandb"]["sync"].split()[-1]).resolve() == Path(
        train["wandb_run"]
    ).resolve()  # the command runs from the project
    evaluate_runs = [
        path
        for path in wandb_folder.glob("offline-run-*")
        if read_offline_run(path)["name"] == f"{run['run_id']}-evaluate"
    ]
    assert len(evaluate_runs) == 1
    evaluate_tracked = read_offline_run(evaluate_runs[0])
    assert "input/model" in evaluate_tracked["config"] and {
        "fairness/sex",
        "gate/checklist",
        "test/confusion_table",
    } <= set(evaluate_tracked["summary"])
    # A tampered model file is refused at load.
    from lifecycle.core import LifecycleError
    from lifecycle.registry import Registry, load_model

    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(LifecycleError, match="SHA-256 does not match"):
        load_model(Registry(heart_project), version)


def test_a_worse_model_is_refused_and_the_champion_stays(champion_project):
    heart_project = champion_project
    settings = heart_project / "settings.ini"
    first = json.loads((heart_project / "first-run.json").read_text())
    champion = stages(first)["train"]["summary"]["model_version"]
    code, _, _, stderr = run_lifecycle(
        "run",
        "--settings",
        settings,
        "-p",
        "prepare.profile=false",
        "-p",
        "train.features=fbs",
        "-p",
        "train.model=logistic_regression",
    )
    assert code == 1
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("lifecycle: stage 'evaluate' failed at cell")
    assert f"the gate refused model version {champion + 1}" in message
    assert "below the minimum 0.750" in message and "significantly worse than the champion" in message
    listing = _models(heart_project)
    assert listing["aliases"]["champion"] == champion
    refused = next(v for v in listing["versions"] if v["version"] == champion + 1)
    assert refused["gate"] is False


def test_an_unfair_model_is_refused_with_the_reason(champion_project):
    code, _, _, stderr = run_lifecycle(
        "run",
        "--settings",
        champion_project / "settings.ini",
        "-p",
        "prepare.profile=false",
        "-p",
        "evaluate.max_fairness_gap=0.02",
    )
    assert code == 1
    assert "the gate refused model version 1: equalized odds difference by sex is" in stderr
    assert "above the maximum 0.020" in stderr
    refused = next(v for v in _models(champion_project)["versions"] if v["version"] == 1)
    assert (
        refused["gate"] is False
    )  # the decision is on the record; aliases are moved only by a passing gate or by hand


def test_a_tracker_that_fails_does_not_fail_the_run(champion_project, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    _, run, _, _ = run_lifecycle(
        "run",
        "--settings",
        champion_project / "settings.ini",
        "-p",
        "prepare.profile=false",
        "-p",
        "train.tracking=online",
        "--stages",
        "collect,prepare,train",
        "--json",
        check=0,
    )
    train = stages(run)["train"]["summary"]
    assert train["wandb_run"] is None
    assert len(train["warnings"]) == 1 and train["warnings"][0].startswith("W&B tracking stopped at 'start'")


def test_any_binary_classification_data_runs_from_collect_to_evaluate(tmp_path):
    """A headerless census-like file with `?` for missing values and text labels, with no code change."""
    rng = np.random.default_rng(7)
    rows = 1500
    age = rng.integers(18, 80, rows)
    hours = rng.integers(10, 70, rows)
    education = rng.choice(["Bachelors", "HS-grad", "Masters", "Some-college"], rows)
    sex = rng.choice(["Male", "Female"], rows)
    signal = 0.04 * (age - 40) + 0.05 * (hours - 40) + np.where(education == "Masters", 1.2, 0) + rng.normal(0, 1, rows)
    income = np.where(signal > 0.5, ">50K", "<=50K")
    frame = pd.DataFrame(
        {
            "age": age,
            "workclass": rng.choice(["Private", "State-gov", "?"], rows),
            "education": education,
            "sex": sex,
            "hours": hours,
            "income": income,
        }
    )
    project = tmp_path / "census"
    project.mkdir()
    frame.to_csv(project / "adult.data", header=False, index=False)
    (project / "settings.ini").write_text("""[data]
sources = census: adult.data
columns = age, workclass, education, sex, hours, income
na_values = ?
target = income
positive = >50K
negative = <=50K
sensitive = sex
[prepare]
profile = false
[train]
model = logistic_regression
[evaluate]
min_auc = 0.7
""")
    _, run, _, _ = run_lifecycle(
        "run", "--settings", project / "settings.ini", "--stages", "collect,prepare,train,evaluate", "--json", check=0
    )
    assert [stage["status"] for stage in run["stages"]] == ["ran"] * 4
    evaluate = stages(run)["evaluate"]["summary"]
    assert evaluate["gate"]["passed"] and evaluate["metrics"]["roc_auc"] > 0.7
    assert set(evaluate["fairness"]) == {"sex"}
    schema = json.loads((project / "schema" / "current.json").read_text())
    assert schema["columns"]["education"]["categories"] == ["bachelors", "hs-grad", "masters", "some-college"]


def test_a_credit_file_with_a_header_and_coded_categories(tmp_path):
    """A CSV with a header, categories coded as `A40`…`A49`, and a target coded 1 (good) / 2 (bad)."""
    rng = np.random.default_rng(11)
    rows = 1200
    duration = rng.integers(6, 60, rows)
    amount = rng.integers(500, 15000, rows)
    purpose = rng.choice([f"A4{i}" for i in range(10)], rows)
    savings = rng.choice(["A61", "A62", "A63", "A64", "A65"], rows)
    age = rng.integers(19, 75, rows)
    foreign = rng.choice(["A201", "A202"], rows, p=[0.9, 0.1])
    risk = (
        0.03 * (duration - 30) + 0.0001 * (amount - 5000) + np.where(savings == "A61", 0.8, 0) + rng.normal(0, 1, rows)
    )
    frame = pd.DataFrame(
        {
            "duration_months": duration,
            "credit_amount": amount,
            "purpose": purpose,
            "savings": savings,
            "age": age,
            "foreign_worker": foreign,
            "risk": np.where(risk > 0.6, 2, 1),
        }
    )
    project = tmp_path / "credit"
    project.mkdir()
    frame.to_csv(project / "german.csv", index=False)
    (project / "settings.ini").write_text("""[data]
sources = bank: german.csv
target = risk
positive = 2
negative = 1
sensitive = age, foreign_worker
[prepare]
profile = false
[evaluate]
min_auc = 0.7
min_group_size = 30
""")
    _, run, _, _ = run_lifecycle("run", "--settings", project / "settings.ini", "--json", check=0)
    train, evaluate = stages(run)["train"]["summary"], stages(run)["evaluate"]["summary"]
    assert evaluate["gate"]["passed"] and evaluate["metrics"]["roc_auc"] > 0.7
    assert set(evaluate["fairness"]) == {"age", "foreign_worker", "age & foreign_worker"}
    meta = json.loads((project / "registry" / "versions" / str(train["model_version"]) / "meta.json").read_text())
    assert meta["features"]["categorical"] == ["purpose", "savings", "foreign_worker"]
    assert sorted(meta["features"]["numeric"]) == ["age", "credit_amount", "duration_months"]


def test_the_gate_decides_the_same_on_a_busy_machine(champion_project):
    """Two processes spinning on the CPUs do not change the decision: the latency check reads the model's CPU cost."""
    first = stages(json.loads((champion_project / "first-run.json").read_text()))["evaluate"]["summary"]
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        _, busy, _, _ = run_lifecycle(
            "run",
            "--settings",
            champion_project / "settings.ini",
            "-p",
            "prepare.profile=false",
            "--from",
            "evaluate",
            "--stages",
            "evaluate",
            "--json",
            check=0,
        )
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    evaluate = stages(busy)["evaluate"]
    assert evaluate["status"] == "ran"

    def decided(gate):
        return gate["passed"], gate["reasons"], [(c["check"], c["passed"]) for c in gate["checks"]]

    assert decided(evaluate["summary"]["gate"]) == decided(first["gate"])
    assert first["gate"]["passed"]
    latency = [c for c in evaluate["summary"]["gate"]["checks"] if c["check"].startswith("single-record latency")]
    assert [(c["passed"], c["threshold"]) for c in latency] == [(True, "at most 50.0 ms")]


def test_a_new_split_neither_flips_fairness_nor_lets_the_champion_win_from_memory(heart_project):
    """The issue's cases: after `prepare.seed=2` made a champion, seed 3 was refused as "significantly worse" because
    its test split held the champion's training patients; and seed 1 alone turned the fairness verdict on a handful of
    positives in one age group."""
    from lifecycle.evaluate import compare_with_champion, load_version
    from lifecycle.metrics import row_hashes
    from lifecycle.registry import Registry

    settings = heart_project / "settings.ini"

    def run(seed):
        _, done, _, _ = run_lifecycle(
            "run",
            "--settings",
            settings,
            "-p",
            "prepare.profile=false",
            "-p",
            f"prepare.seed={seed}",
            "--stages",
            "collect,prepare,train,evaluate",
            "-p",  # W&B is not what this test is about (test_default_project_reaches... checks it): no tracker process
            "train.tracking=disabled",
            "-p",
            "evaluate.tracking=disabled",
            "--json",
            check=0,
        )
        return done

    first = stages(run(2))["evaluate"]["summary"]
    assert first["champion_version"] == 1
    second_run = run(3)
    second = stages(second_run)["evaluate"]["summary"]
    assert second["gate"]["passed"], second["gate"]["reasons"]
    clean = pd.read_parquet(Path(second_run["run_dir"]) / "prepare" / "clean.parquet")
    test = clean[clean["_split"] == "test"]
    registry = Registry(heart_project)
    champion, challenger = load_version(registry, 1), load_version(registry, 2)
    seen = np.isin(row_hashes(test), list(champion["trained"]))
    assert seen.sum() > 30  # the new test split holds many of the champion's training patients
    assert (
        second["versus_champion"]["rows"] == len(test) - seen.sum()
        and second["versus_champion"]["champion_rows_recorded"]
    )

    # Scored on every test row, the champion wins from memory: the comparison the gate used to make refuses the new
    # model.
    def features(version):
        return version["meta"]["features"]["numeric"] + version["meta"]["features"]["categorical"]

    y = test["_label"].to_numpy().astype(int)
    on_every_row = compare_with_champion(
        y,
        challenger["model"].predict_proba(test[features(challenger)])[:, 1],
        champion["model"].predict_proba(test[features(champion)])[:, 1],
        np.ones(len(test), bool),
    )
    assert on_every_row["high"] < 0
    assert second["versus_champion"]["high"] >= 0
    # Seed 1 turned the fairness verdict (0.623 by age on the test split alone); on every labeled row it agrees with
    # seeds 2 and 3.
    third = stages(run(1))["evaluate"]["summary"]
    for summary in (first, second, third):
        fairness_checks = [c for c in summary["gate"]["checks"] if c["check"].startswith("equalized odds")]
        assert len(fairness_checks) == 2 and all(c["passed"] for c in fairness_checks), fairness_checks  # sex, age
        assert {row["verdict"] for row in summary["fairness_by_seed"] if row["gated"]} == {"passed"}


def test_a_patient_id_column_does_not_flip_the_gate(champion_template, tmp_path):
    """The issue's case: a patient id column keeps the default data's one repeated row as two patients, which moves the
    seeded split by one row; that alone turned the gate from passed to refused ("equalized odds difference by age is
    0.500 (0.341–1.000)", a rate from a handful of patients on 119 test rows). Judged on every labeled row, on groups
    with enough patients, the decision is the same with the id as without it (the template's run)."""
    project = tmp_path / "heart-with-ids"
    shutil.copytree(HEART, project / "data" / "heart-disease-uci")
    for path in sorted((project / "data" / "heart-disease-uci").glob("processed.*.data")):
        prefix = path.name.split(".")[1][:2].upper()  # CL0001, HU0001, ...: an id a hospital might write
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(f"{prefix}{number:04d},{line}\n" for number, line in enumerate(lines, 1)))
    text = (REPO / "settings.ini").read_text()
    assert "\ncolumns = age, sex," in text and "\nid =\n" in text
    (project / "settings.ini").write_text(
        text.replace("\ncolumns = age, sex,", "\ncolumns = patient_id, age, sex,", 1).replace(
            "\nid =\n", "\nid = patient_id\n", 1
        )
    )
    _, run, _, _ = run_lifecycle(
        "run",
        "--settings",
        project / "settings.ini",
        "--stages",
        "collect,prepare,train,evaluate",
        "-p",
        "prepare.profile=false",
        "-p",
        "train.tracking=disabled",
        "-p",
        "evaluate.tracking=disabled",
        "--json",
        check=0,
    )
    with_ids = stages(run)
    without = stages(json.loads((champion_template / "first-run.json").read_text()))
    # the id keeps the repeated row: one more clean row, so every split moved
    assert (with_ids["prepare"]["summary"]["rows_clean"], without["prepare"]["summary"]["rows_clean"]) == (597, 596)

    def decided(summary):
        return summary["gate"]["passed"], [(c["check"], c["passed"]) for c in summary["gate"]["checks"]]

    assert decided(with_ids["evaluate"]["summary"]) == decided(without["evaluate"]["summary"]), with_ids["evaluate"][
        "summary"
    ]["gate"]
    assert with_ids["evaluate"]["summary"]["gate"]["passed"]
    for summary in (
        with_ids["evaluate"]["summary"],
        without["evaluate"]["summary"],
    ):  # and no seed of the folds refuses either
        assert {row["verdict"] for row in summary["fairness_by_seed"] if row["gated"]} == {"passed"}, summary[
            "fairness_by_seed"
        ]
