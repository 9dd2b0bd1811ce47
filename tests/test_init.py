"""`lifecycle init`: a project's settings.ini for the user's own data. The inferred settings match the hand-written
ones of the default project on every key that matters; messy files are read as collect reads them; a target that
cannot be predicted, a headerless file without --columns and an existing settings.ini are refused in one line; and
`lifecycle run` works on what init wrote."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import HEART, HEART_COLUMNS, REPO, run_lifecycle

from lifecycle.core import LifecycleError, load_settings
from lifecycle.init_project import init_project
from lifecycle.pipeline import check_sections, discover_stages, stage_parameters
from lifecycle.tasks import infer_task

BIKES = REPO / "examples" / "bike-sharing" / "data" / "bike-rental-dataset.csv"
TRAINING = [str(HEART / "processed.cleveland.data"), str(HEART / "processed.hungarian.data")]
PRODUCTION = [str(HEART / "processed.switzerland.data"), str(HEART / "processed.va.data")]


def messy_csv(path: Path, rows: int = 400, seed: int = 0, constant: bool = False) -> Path:
    """Patients as a spreadsheet saves them: a UTF-8 byte-order mark, `;` between fields, decimal commas, Windows line
    ends, an identifier column, a visit date, `?` for a blood pressure not taken, zeros for a cholesterol not
    measured, and an outcome driven by blood pressure, cholesterol and smoking."""
    rng = np.random.default_rng(seed)
    lines = ["patient_id;visit_date;age;sex;chol;bp;smoker;outcome"]
    for i in range(rows):
        chol = 0.0 if rng.random() < 0.1 else rng.normal(230, 40)
        bp, smoker = rng.normal(130, 15), rng.choice(["yes", "no"], p=[0.35, 0.65])
        risk = 0.08 * (bp - 130) + (1.5 if smoker == "yes" else 0) + 0.02 * (chol - 230 if chol else 0)
        outcome = "no" if constant else "yes" if risk + rng.normal(0, 0.7) > 0.5 else "no"
        shown_bp = "?" if rng.random() < 0.05 else f"{bp:.1f}".replace(".", ",")
        shown_chol = f"{chol:.1f}".replace(".", ",")
        lines.append(
            f"H{i * 7919 % 100000:05};2023-{i % 12 + 1:02}-{i % 28 + 1:02};{rng.integers(30, 80)};"
            f"{'MF'[int(rng.integers(0, 2))]};{shown_chol};{shown_bp};{smoker};{outcome}"
        )
    path.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(lines) + "\r\n").encode())
    return path


def test_the_default_project_matches_its_hand_written_settings(tmp_path):
    """On the default project's training files (headerless: --columns), as a binary task: target, task, positive,
    negative, na_values, sensitive, id and timestamp are the hand-written ones. They differ in one key, [prepare]
    missing_values: the zeros of chol and trestbps live only in the Swiss and VA files, kept for production; on all four
    files init finds exactly the hand-written `chol: 0` and `trestbps: 0`."""
    hand = load_settings(REPO / "settings.ini")
    result = init_project(TRAINING, "num", tmp_path / "two", task="binary", columns=HEART_COLUMNS)
    written = load_settings(result["settings"])
    for key in ("target", "positive", "negative", "na_values", "id", "timestamp"):
        assert getattr(written, key) == getattr(hand, key), key
    assert set(written.sensitive) == set(hand.sensitive)
    assert written.task == infer_task(pd.Series([0, 1, 2, 3, 4]), hand)[0] == "binary"  # hand-written: from positive
    assert written.sources[0].location == str(HEART / "processed.cleveland.data")
    assert result["missing_values"] == []  # no zero in Cleveland and Hungary
    every = init_project(TRAINING + PRODUCTION, "num", tmp_path / "four", task="binary", columns=HEART_COLUMNS)
    assert set(every["missing_values"]) == {"chol", "trestbps"}
    zeros = load_settings(every["settings"]).sections["prepare"]["missing_values"]
    assert {line.replace(" ", "") for line in zeros.splitlines()} == {
        line.replace(" ", "") for line in hand.sections["prepare"]["missing_values"].splitlines()
    }
    # left to infer, num's five grades are classes
    assert init_project(TRAINING, "num", tmp_path / "grades", columns=HEART_COLUMNS)["task"] == "multiclass"


def test_a_headerless_file_needs_its_column_names(tmp_path):
    with pytest.raises(LifecycleError, match=r"no header line; name its columns in order with --columns"):
        init_project(TRAINING[:1], "num", tmp_path)
    assert not (tmp_path / "settings.ini").exists()


def test_bike_sharing_is_a_regression_split_by_time_without_the_parts_of_its_target(tmp_path):
    "The hourly rentals: regression on cnt, dteday the time, casual + registered = cnt left out of the features."
    result = init_project([str(BIKES)], "cnt", tmp_path)
    assert (result["task"], result["timestamp"], result["id"], result["sensitive"]) == ("regression", "dteday", "", [])
    assert result["na_values"] == []  # its 875 + 1,258 missing cells are empty, missing without a spelling
    assert (
        "casual" not in result["features"] and "registered" not in result["features"] and "temp" in result["features"]
    )
    written = load_settings(result["settings"])
    assert written.sections["prepare"]["split"] == "time"
    text = Path(result["settings"]).read_text()
    assert "# casual + registered = cnt on each of the 17,379 rows" in text
    assert "weekday 875, weathersit 1,258" in text


def test_a_messy_file_is_read_as_collect_reads_it_and_no_identifier_is_quoted(tmp_path):
    data = messy_csv(tmp_path / "visits.csv")
    result = init_project([str(data)], "outcome", tmp_path / "project")
    assert (result["task"], result["positive"], result["negative"]) == ("binary", ["yes"], ["no"])
    assert (result["id"], result["timestamp"]) == ("patient_id", "visit_date")
    assert result["na_values"] == ["?"] and result["missing_values"] == ["chol"]
    assert set(result["sensitive"]) == {"age", "sex"}
    text = Path(result["settings"]).read_text()
    assert "visits.csv :: delimiter=semicolon decimal=comma" in text
    assert "byte-order mark dropped" in text and "CONFIRM" in text
    assert not any(f"H{i * 7919 % 100000:05}" in text for i in range(400))  # no identifier in the comments
    assert "bp: numbers from" in text  # decimal commas read as numbers


def test_every_key_init_writes_is_a_key_its_stage_reads(tmp_path):
    "The settings parser and every stage's parameters accept the file as init wrote it."
    result = init_project([str(messy_csv(tmp_path / "visits.csv"))], "outcome", tmp_path / "p")
    bikes = init_project([str(BIKES)], "cnt", tmp_path / "b")
    stages = discover_stages()
    for written in (load_settings(result["settings"]), load_settings(bikes["settings"])):
        check_sections(written, stages)
        for stage in stages:
            stage_parameters(stage, written)
    assert load_settings(bikes["settings"]).sections["train"]["features"]


@pytest.mark.parametrize(
    "target, constant, message",
    [
        ("diagnosis", False, r"the data has no column `diagnosis` to predict; its columns are patient_id"),
        ("outcome", True, r"the target `outcome` holds one value on each of its 400 rows: .* choose another --target"),
        ("patient_id", False, r"too many or too rare to be classes .* choose another --target"),
    ],
)
def test_a_target_that_cannot_be_predicted_is_refused(tmp_path, target, constant, message):
    data = messy_csv(tmp_path / "visits.csv", constant=constant)
    with pytest.raises(LifecycleError, match=message) as refused:
        init_project([str(data)], target, tmp_path)
    assert "\n" not in str(refused.value) and "H07919" not in str(refused.value)
    assert not (tmp_path / "settings.ini").exists()


def test_a_binary_target_without_a_conventional_yes_asks_for_positive(tmp_path):
    data = tmp_path / "status.csv"
    data.write_text("x,status\n" + "".join(f"{i},{'sick' if i % 3 else 'well'}\n" for i in range(30)))
    with pytest.raises(LifecycleError, match=r"none is yes by the usual conventions .* --positive VALUE"):
        init_project([str(data)], "status", tmp_path)
    result = init_project([str(data)], "status", tmp_path, positive=["sick"])
    assert (result["positive"], result["negative"]) == (["sick"], ["well"])


def test_init_refuses_to_overwrite_without_force(tmp_path):
    """The command as a user types it: init refuses to overwrite without --force, then writes again with it. (That
    `lifecycle run` runs what init wrote, through the gate, deploy and monitoring, is the README's own commands run
    literally: tests/test_first_hour.py.)"""
    data = messy_csv(tmp_path / "visits.csv")
    project = tmp_path / "project"
    run_lifecycle("init", data, "--target", "outcome", "--into", project, check=0)
    code, _, _, error = run_lifecycle("init", data, "--target", "outcome", "--into", project)
    assert code == 1 and "never overwrites it: pass --force" in error and len(error.strip().splitlines()) == 1
    _, result, _, _ = run_lifecycle(
        "init", data, "--target", "outcome", "--into", project, "--force", "--json", check=0
    )
    assert result["id"] == "patient_id"


def test_a_sql_source_and_a_parquet_file(tmp_path, monkeypatch):
    """A SQLite query named from the working folder (its relative file resolved from there, then written relative to
    the project) and a Parquet file with a datetime column: the same inferences as from text."""
    import sqlite3

    frame = pd.read_csv(messy_csv(tmp_path / "visits.csv"), sep=";", decimal=",", na_values="?", encoding="utf-8-sig")
    with sqlite3.connect(tmp_path / "clinic.db") as connection:
        frame.to_sql("visits", connection, index=False)
    monkeypatch.chdir(tmp_path)
    result = init_project(["sqlite:///clinic.db :: SELECT * FROM visits"], "outcome", ".")
    assert (result["id"], result["timestamp"], result["positive"]) == ("patient_id", "visit_date", ["yes"])
    assert "sources = database: sqlite:///clinic.db :: SELECT * FROM visits" in Path(result["settings"]).read_text()
    frame.assign(visit_date=pd.to_datetime(frame["visit_date"])).to_parquet(tmp_path / "visits.parquet")
    parquet = init_project(["visits.parquet"], "outcome", "parquet")
    assert {key: parquet[key] for key in ("id", "timestamp", "task", "sensitive")} == {
        key: result[key] for key in ("id", "timestamp", "task", "sensitive")
    }


@pytest.mark.parametrize("example", ["heart-severity", "bike-sharing"])
def test_the_examples_match_their_hand_written_settings(tmp_path, example):
    """init on each example's raw training file against its hand-written settings.ini: target, task, na_values, id,
    timestamp and the split are the same. One key differs, on purpose: bike-sharing's hand-written `sensitive =
    workingday, weathersit` audits kinds of day and weather, not people; init proposes only columns that describe
    people (age, sex …), and bikes have none, so it leaves `sensitive` empty."""
    hand = load_settings(REPO / "examples" / example / "settings.ini")
    files = [str(REPO / "examples" / example / source.location) for source in hand.sources]
    if example == "heart-severity":  # its sources are the default project's headerless files, two folders up
        files = [str(HEART / Path(source.location).name) for source in hand.sources]
    result = init_project(files, hand.target, tmp_path, columns=HEART_COLUMNS if example == "heart-severity" else None)
    written = load_settings(result["settings"])
    for key in ("target", "task", "na_values", "id", "timestamp"):
        assert getattr(written, key) == getattr(hand, key), key
    prepare = next(stage for stage in discover_stages() if stage.name == "prepare")
    default = prepare.parameters["split"]["default"].strip("'\"")  # a key left out is the notebook's default

    def split(settings):
        return settings.sections.get("prepare", {}).get("split") or default

    assert split(written) == split(hand)
    if example == "heart-severity":
        assert set(written.sensitive) == set(hand.sensitive) == {"sex", "age"}
    else:
        assert written.sensitive == [] and set(hand.sensitive) == {"workingday", "weathersit"}
