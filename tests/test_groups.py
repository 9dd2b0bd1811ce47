"""One grouping of sensitive columns: the gate and monitoring judge the same groups of the same people, the same way.

The grouping is decided on the training rows and stored in reference.json by the train stage's own functions; the gate
(`evaluate.sensitive_groups`, `evaluate.fairness_audit`) and monitoring (`monitoring.window_report`) each cut by it. On
the same rows, scored by the same model at the same threshold, their gaps must be equal, and a group with too few rows
or positives must be left out of both."""

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from lifecycle.core import load_settings
from lifecycle.fairness import fairness_audit, sensitive_groups
from lifecycle.metrics import sensitive_grouping
from lifecycle.monitoring import window_report
from lifecycle.train import reference_statistics

SENSITIVE = ["sex", "age"]


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    "The project's settings: the sensitive columns and the value labels the groups are named by."
    ini = tmp_path_factory.mktemp("groups") / "settings.ini"
    ini.write_text(
        "[data]\nsources = a: a.csv\ntarget = num\npositive = 1\nsensitive = sex, age\n"
        "names = age: age\nunits = age: years\nlabels = sex: 0 = female, 1 = male\n"
    )
    return load_settings(ini)


def _patients(rng, rows, old_share):
    "Rows of patients: age (whole years), sex, a risk the score and the label follow; older patients more often sick."
    age = np.where(rng.random(rows) < old_share, rng.integers(60, 80, rows), rng.integers(29, 60, rows)).astype(float)
    frame = pd.DataFrame({"age": age, "sex": rng.choice(["0", "1"], rows, p=[0.3, 0.7])})
    frame.loc[rng.random(rows) < 0.03, "age"] = np.nan  # a few ages not given: their own group, in both
    risk = (np.nan_to_num(age, nan=55) - 55) / 10 + (frame["sex"] == "1") * 0.5 + rng.normal(0, 1, rows)
    frame["score"] = 1 / (1 + np.exp(-risk))
    frame["label"] = (rng.random(rows) < frame["score"]).astype(float)
    return frame


def _reference(train, words, stored):
    "reference.json as the train stage writes it (through JSON); without `groups` when stored before groupings were."
    grouping = sensitive_grouping(train, words) if stored else None
    reference = reference_statistics(
        train, ["age"], ["sex"], train["score"].to_numpy(), train["label"].to_numpy().astype(int), grouping
    )
    if not stored:
        reference.pop("groups")
    return json.loads(json.dumps(reference))


def _gate_and_monitor(rows, reference, threshold, min_group):
    "The gate's audit and monitoring's window, both on `rows`, judging groups from `min_group` rows and positives."
    labels = rows["label"].to_numpy().astype(int)
    scores = rows["score"].to_numpy()
    audit = fairness_audit(
        labels,
        scores,
        threshold,
        sensitive_groups(rows, SENSITIVE, reference),
        min_size=min_group,
        min_positives=min_group,
        min_negatives=min_group,
        resamples=0,
    )
    window = rows.assign(decision=(scores >= threshold).astype(int), event_time=pd.Timestamp("2024-05-06", tz="UTC"))
    report = window_report(window, reference, threshold, "week", SENSITIVE, min_group=min_group, n_boot=0)
    return audit, report


def _same(gate, monitor):
    return (gate is None and monitor is None) or (
        gate is not None and monitor is not None and gate == pytest.approx(monitor, abs=1e-12)
    )


@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(30, 400),
    old_share=st.floats(0.02, 0.6),
    threshold=st.floats(0.2, 0.8),
    min_group=st.integers(3, 40),
    stored=st.booleans(),
)
@hypothesis_settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_gate_and_monitoring_judge_the_same_groups_alike(
    words, seed, rows, old_share, threshold, min_group, stored
):
    rng = np.random.default_rng(seed)
    reference = _reference(_patients(rng, 500, 0.3), words, stored)
    evaluated = _patients(rng, rows, old_share)  # another mix of ages than training: the groups must not move with it
    audit, report = _gate_and_monitor(evaluated, reference, threshold, min_group)
    for column in SENSITIVE:
        gate, monitor = audit[column], {row["group"]: row for row in report["groups"][column]}
        assert sorted(monitor) == sorted(row["group"] for row in gate["groups"]), (
            column
        )  # the same groups, by the same names
        unjudged = set(gate["groups_too_small"]) | set(gate["groups_too_few_positives"])
        assert {group for group, row in monitor.items() if row["too_small"]} == unjudged, column
        for row in gate["groups"]:
            assert monitor[row["group"]]["n"] == row["n"] and monitor[row["group"]]["positives"] == row["positives"]
        assert _same(gate["true_positive_rate_difference"], report["values"][f"recall_gap.{column}"]), column
        assert _same(gate["demographic_parity_difference"], report["values"][f"selection_rate_gap.{column}"]), column


def test_groups_are_cut_at_the_training_rows_and_named_in_words(words):
    rng = np.random.default_rng(3)
    train = _patients(rng, 500, 0.3)
    reference = _reference(train, words, stored=True)
    cuts = reference["groups"]["age"]["cuts"]
    assert cuts == pytest.approx(np.nanquantile(train["age"], [0.25, 0.5, 0.75]).tolist())
    older = _patients(rng, 300, 0.9)  # an evaluation or a production window of older patients: same cut points
    audit, report = _gate_and_monitor(older, reference, 0.5, 20)
    names = sorted(row["group"] for row in audit["age"]["groups"])
    assert names == sorted(row["group"] for row in report["groups"]["age"])
    assert all(name.startswith("age ") for name in names) and f"age ≤{int(cuts[0])}" in names
    assert sorted(row["group"] for row in audit["sex"]["groups"]) == ["female", "male"]
    assert {row["group"].split(" & ")[0] for row in audit["sex & age"]["groups"]} == {"female", "male"}
