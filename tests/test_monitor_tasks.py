"""Monitoring a multiclass and a regression model end to end: a registered version, a real SQLite prediction log
with late labels, `monitor_project` and `lifecycle monitor`'s words. Labels are whole numbers here (class indices,
counts): the log keeps labels as integers until serve22 makes them numbers."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from lifecycle.core import open_project
from lifecycle.dashboard import read_state, render
from lifecycle.dashboard_sections import accuracy_html
from lifecycle.monitor_words import monitor_text
from lifecycle.monitoring import monitor_project
from lifecycle.registry import Registry, register, set_alias
from lifecycle.serving.predlog import open_log
from lifecycle.task_multiclass import MulticlassTask
from lifecycle.task_regression import RegressionTask
from lifecycle.train import reference_statistics

MONDAY = pd.Timestamp("2024-05-06", tz="UTC")
NUMERIC = ["x0", "x1"]


def _project(root, model, reference, decision, settings):
    "A project whose champion is `model`, its reference and decision record stored as train and evaluate store them."
    registry = Registry(root)
    meta = {
        "threshold": decision["parameter"],
        "decision": decision,
        "task": decision["task"],
        "features": {"numeric": NUMERIC},
    }
    version = register(registry, model, meta, {"reference.json": json.dumps(reference)})
    set_alias(registry, "champion", version, "test")
    (root / "settings.ini").write_text(settings + "\n[monitor]\nwindow = day\nbootstrap = 50\n")
    return open_project(root / "settings.ini")


def _log(root, rows, labels, day):
    "Predictions on `day` (days after MONDAY), then their labels, through the project's real SQLite log."
    with open_log("", root) as log:
        log.record([{**row, "time": MONDAY + pd.Timedelta(days=day, minutes=i)} for i, row in enumerate(rows)])
        assert log.flush(timeout=30)
        for row, label in zip(rows, labels):
            log.record_label(row["request_id"], int(label), MONDAY + pd.Timedelta(days=day + 1))
        assert log.flush(timeout=30)


@pytest.fixture
def rides(tmp_path):
    "A regression project (rentals an hour) whose second day's errors are three times the first's."
    rng = np.random.default_rng(5)
    train = pd.DataFrame({name: rng.normal(0, 1, 3000) for name in NUMERIC})
    truth = 200 + 40 * train["x0"] + rng.normal(0, 10, 3000)
    model = Ridge().fit(train[:2000], truth[:2000])
    held = model.predict(train[2000:])  # rows the model did not train on: the reference's answers and losses
    half = float(np.quantile(np.abs(truth[2000:] - held), 0.9))
    task = RegressionTask()
    reference = reference_statistics(train[2000:], NUMERIC, [], held, truth[2000:].to_numpy(), task=task)
    settings = "[data]\nsources = a: a.csv\ntarget = cnt\ntask = regression\nunits = cnt: rentals\n"
    project = _project(tmp_path, model, reference, {"task": "regression", "parameter": half, "target": 0.9}, settings)
    for day, noise in ((0, 10), (1, 30)):
        x = pd.DataFrame({name: rng.normal(0, 1, 300) for name in NUMERIC})
        values = model.predict(x)
        actual = np.round(200 + 40 * x["x0"] + rng.normal(0, noise, 300))
        rows = [
            {
                "request_id": f"d{day}-{i}",
                "model_version": 1,
                "channel": "online",
                "score": float(values[i]),
                "decision": 0,
                "features": {name: float(x[name][i]) for name in NUMERIC},
            }
            for i in range(300)
        ]
        _log(tmp_path, rows, actual, day)
    return project


def test_a_regression_window_says_mae_coverage_and_its_estimate_and_alerts_when_the_interval_breaks(rides):
    summary = monitor_project(rides, now=MONDAY + pd.Timedelta(days=3), post=lambda url, payload: (True, "sent"))
    windows = pd.read_parquet(rides.root / "monitoring" / "windows.parquet").sort_values("window_start")
    calm, rough = windows.iloc[0], windows.iloc[1]
    assert (calm["labeled"], rough["labeled"]) == (300, 300)
    assert rough["mae"] > 2 * calm["mae"]  # the errors tripled
    assert calm["coverage_short"] == 0 and rough["coverage_short"] == 1  # 90% promised, far fewer held on day 2
    assert abs(calm["estimated_mae"] - calm["mae"]) < 0.2 * calm["mae"]  # DLE before the labels, where nothing moved
    assert calm["prediction_drift"] == 0
    assert summary["latest"]["task"] == "regression"
    firing = [alert["labels"]["alertname"] for alert in summary["alerts"]["firing"]]
    assert firing == ["interval_coverage"], summary["alerts"]
    text = monitor_text(summary, [], rides.settings.column_name, rides.settings)
    assert f"Realized MAE {RegressionTask().number(rough['mae'])} rentals" in text, text
    assert "The 90% prediction interval held" in text and "below its target" in text, text
    assert "Estimated MAE" in text and "ROC AUC" not in text
    page = accuracy_html(windows, RegressionTask(rides.settings))  # the dashboard's accuracy over time: MAE
    assert "estimates from direct loss estimation" in page and "calibrated scores" not in page
    board = render(read_state(rides, now=MONDAY + pd.Timedelta(days=3)), rides.settings)  # the whole page draws
    assert "direct loss estimation" in board["accuracy"] and "interval_coverage" in board["alerts"]


def test_a_multiclass_window_says_balanced_accuracy_and_the_class_mix_with_hostile_class_names(tmp_path):
    rng = np.random.default_rng(6)
    train = pd.DataFrame({name: rng.normal(0, 1, 1500) for name in NUMERIC})
    labels = np.digitize(train["x0"] + rng.normal(0, 0.5, 1500), [-0.5, 0.5])  # classes 0, 1, 2
    model = LogisticRegression(max_iter=500).fit(train[:1000], labels[:1000])
    task = MulticlassTask()
    task.classes = np.array(["0", "1", "2"])
    held = model.predict_proba(train[1000:])
    reference = reference_statistics(train[1000:], NUMERIC, [], held, labels[1000:].astype(str), task=task)
    settings = (
        "[data]\nsources = a: a.csv\ntarget = grade\ntask = multiclass\n"
        "labels = grade: 0 = <b>none</b>, 1 = mild, 2 = severe\n"
    )
    project = _project(tmp_path, model, reference, {"task": "multiclass", "parameter": 1.0}, settings)
    x = pd.DataFrame({name: rng.normal(1.0, 1, 400) for name in NUMERIC})  # production leans to the severe class
    proba = model.predict_proba(x)
    truth = np.digitize(x["x0"] + rng.normal(0, 0.5, 400), [-0.5, 0.5])
    rows = [
        {
            "request_id": f"m{i}",
            "model_version": 1,
            "channel": "online",
            "score": float(proba[i].max()),
            "decision": int(proba[i].argmax()),
            "features": {name: float(x[name][i]) for name in NUMERIC},
        }
        for i in range(400)
    ]
    _log(tmp_path, rows, truth, 0)
    summary = monitor_project(project, now=MONDAY + pd.Timedelta(days=3))
    values = summary["latest"]["values"]
    expected = (truth == proba.argmax(axis=1)).mean()
    assert values["accuracy"] == pytest.approx(expected)  # measured from the classes called and their labels
    assert values["balanced_accuracy"] is not None and values["prediction_drift"] == 1  # the mix moved to severe
    text = monitor_text(summary, [], project.settings.column_name, project.settings)
    assert "Realized balanced accuracy" in text and "Classes called: <b>none</b>" in text, text
    assert "(the mix drifted from training's)" in text
    board = render(read_state(project, now=MONDAY + pd.Timedelta(days=3)), project.settings)
    assert "multiclass CBPE" in board["accuracy"] and "<b>none</b>" not in "".join(board.values())
