"""Estimates that survive label shift, and calibration drift, on a real prediction log (SQLite) and a real champion:
the EM prior adjustment recovers a known production prevalence, a window outside the reference's support says its
estimates cannot be trusted, and the calibration alert fires and resolves."""

import json
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from lifecycle.core import open_project
from lifecycle.monitoring import monitor_project
from lifecycle.registry import Registry, register, set_alias
from lifecycle.serving.predlog import open_log
from lifecycle.train import reference_statistics

FEATURES = ["x0", "x1"]
MONDAY = pd.Timestamp("2024-05-06", tz="UTC")
NOW = datetime(2024, 6, 1, tzinfo=timezone.utc)


def _rows(rng, count, prevalence, shift=0.0):
    "Label-shifted rows: p(x | y) stays (x ~ N(±1, 1)), only the share of positives changes."
    labels = (rng.random(count) < prevalence).astype(int)
    features = pd.DataFrame({name: rng.normal(2 * labels - 1, 1.0) + shift for name in FEATURES})
    return features, labels


@pytest.fixture
def project(tmp_path):
    "A champion trained at 30% prevalence, its reference (with the isotonic calibration) by reference_statistics."
    rng = np.random.default_rng(3)
    train, labels = _rows(rng, 4000, 0.3)
    model = LogisticRegression().fit(train, labels)
    reference = reference_statistics(train, FEATURES, [], model.predict_proba(train)[:, 1], labels)
    registry = Registry(tmp_path)
    version = register(
        registry,
        model,
        {"threshold": 0.5, "features": {"numeric": FEATURES, "categorical": []}},
        {"reference.json": json.dumps(reference)},
    )
    set_alias(registry, "champion", version, "test")
    (tmp_path / "settings.ini").write_text(
        "[data]\nsources = a: a.csv\ntarget = y\npositive = 1\n\n[monitor]\nwindow = week\nbootstrap = 100\n"
    )
    return tmp_path, model


def _log_week(root, model, rng, week, prevalence, shift=0.0, labels_from=None):
    "A week of predictions (its labels logged too: the true ones, or drawn from the scores when `labels_from`)."
    features, labels = _rows(rng, 2000, prevalence, shift)
    scores = model.predict_proba(features)[:, 1]
    if labels_from == "scores":
        labels = (rng.random(len(scores)) < scores).astype(int)
    start = MONDAY + pd.Timedelta(days=7 * week)
    ids = [f"w{week}-{i}" for i in range(len(scores))]
    with open_log("", root) as log:
        log.record_many(
            ids, scores, (scores >= 0.5).astype(int), features, model_version=1, channel="batch", time=start
        )
        if labels_from is not None:
            for request_id, label in zip(ids, labels):
                log.record_label(request_id, int(label), (start + pd.Timedelta(days=1)).isoformat())
        log.flush()
    return labels


def test_em_recovers_a_known_prevalence_where_cbpe_does_not(project):
    root, model = project
    truth = _log_week(root, model, np.random.default_rng(5), 0, 0.8)
    values = monitor_project(open_project(root / "settings.ini"), now=NOW)["latest"]["values"]
    assert values["estimator"] == "label_shift"
    assert values["shift_prevalence_low"] <= truth.mean() <= values["shift_prevalence_high"]
    assert abs(values["estimated_prevalence"] - truth.mean()) < 0.05
    assert abs(values["cbpe_prevalence"] - truth.mean()) > 0.1  # calibrated at 30%, CBPE stays near it
    assert values["estimated_recall"] == values["shift_recall"] and values["estimated_recall_low"] is not None


def test_a_window_outside_the_reference_says_its_estimates_cannot_be_trusted(project):
    root, model = project
    _log_week(root, model, np.random.default_rng(6), 0, 0.3, shift=40.0)  # every value far beyond training's
    latest = monitor_project(open_project(root / "settings.ini"), now=NOW)["latest"]
    assert latest["values"]["estimator"] == "none" and latest["values"]["outside_share"] == 1.0
    assert latest["values"]["estimated_roc_auc"] is None and latest["values"]["estimated_recall"] is None
    assert latest["values"]["cbpe_recall"] is not None  # kept beside, for the benchmark: not shown
    assert any(line.startswith("estimates cannot be trusted: 100% of") for line in latest["statements"])


def test_the_calibration_alert_fires_then_resolves(project):
    root, model = project
    rng = np.random.default_rng(8)
    _log_week(root, model, rng, 0, 0.8, labels_from="true")  # calibrated at 30%: at 80% the scores are too low
    first = monitor_project(open_project(root / "settings.ini"), now=NOW)
    values = first["latest"]["values"]
    assert values["calibration_error_low"] > 0.1 and values["last_labeled.calibration_excess"] > 0.1
    assert [alert["labels"]["alertname"] for alert in first["alerts"]["firing"]] == ["calibration_drift"]
    details = json.loads((root / "monitoring" / "details" / f"{first['latest']['window']}.json").read_text())
    assert details["reliability"]["window"] and details["reliability"]["reference"]

    _log_week(root, model, rng, 1, 0.3, labels_from="scores")  # labels as the scores say: calibrated again
    second = monitor_project(open_project(root / "settings.ini"), now=NOW)
    assert second["latest"]["values"]["last_labeled.calibration_excess"] < 0.1
    assert [(a["labels"]["alertname"], a["status"]) for a in second["alerts"]["sent"]] == [
        ("calibration_drift", "resolved")
    ]
    off = monitor_project(open_project(root / "settings.ini"), now=NOW, settings={"max_calibration_error": "0"})
    assert off["alerts"]["firing"] == []
