"""`lifecycle simulate` repeats itself with the same seed. The part of it that did not: the same patients sent through
the scoring app twice (eight requests in flight, so each run logs them in its own order, with its own request ids and
scoring times) must give the same retraining data, rows and order, and the same monitoring figures. The days' start
(`simulation_start`, a Monday midnight whatever the hour of the run) is tested in its notebook."""

import math
import shutil
from datetime import datetime, timezone

import pandas as pd

from lifecycle.core import open_project
from lifecycle.monitoring import monitor_project
from lifecycle.retrain import labeled_with_sources, write_retraining_data
from lifecycle.serving.predlog import open_log
from lifecycle.serving.replay import run_async
from lifecycle.simulate import _production_rows
from lifecycle.simulate_traffic import _send_day, _traffic


def _send(project, traffic) -> None:
    "Day 0's patients, then day 1's with day 0's diagnoses: the simulation's own steps, concurrency 8."
    plan, arrivals = traffic["plan"], traffic["arrivals"]
    first = plan.index[plan["_day"] == 0]
    sent = run_async(
        lambda: _send_day(project, plan.loc[first], arrivals.loc[first], traffic["fields_from"], [], concurrency=8)
    )
    assert sent["scored"] > 100, sent  # the contract refuses a few (too many missing values)
    due = [
        (request_id, traffic["labels"][index], traffic["diagnosed"][index])
        for index, request_id in zip(first, sent["request_ids"])
        if request_id and not pd.isna(traffic["diagnosed"][index])
    ]
    assert len(due) > 40, len(due)  # enough labeled patients for a holdout cut inside the day
    second = plan.index[plan["_day"] == 1]
    run_async(
        lambda: _send_day(project, plan.loc[second], arrivals.loc[second], traffic["fields_from"], due, concurrency=8)
    )


def _outcome(project, now: datetime) -> dict:
    "The retraining data and the monitoring figures the simulation's decisions rest on."
    with open_log(project.log_url, project.root) as log:
        labeled, _ = labeled_with_sources(log)
    manifest = write_retraining_data(project.settings, {"holdout_share": 0.5}, labeled, now, "repeat")
    folder = project.root / "retrain" / "repeat"
    per_run = ["request_id", "time"]  # each run's own: its request ids and when the app scored
    latest = monitor_project(project, now=now, settings={"alerts": ""})["latest"]
    return {
        "counts": (manifest["training_rows"], manifest["holdout_rows"]),
        "production": pd.read_parquet(folder / "production.parquet"),
        "holdout": pd.read_parquet(folder / "holdout.parquet").drop(columns=per_run),
        "recent": pd.read_parquet(folder / "recent.parquet").drop(columns=per_run),
        "window": latest["window"],
        "values": latest["values"],
    }


def _same_figures(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name, value in first.items():
        other = second[name]
        if isinstance(value, float) and isinstance(other, float):
            assert math.isclose(value, other, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(value) and math.isnan(other))
        else:
            assert value == other, name


def test_the_same_traffic_twice_gives_the_same_retraining_data_and_figures(champion_template, tmp_path):
    projects = []
    for name in ("first", "second"):
        shutil.copytree(champion_template, tmp_path / name, symlinks=True)
        projects.append(open_project(tmp_path / name / "settings.ini"))
    production = _production_rows(projects[0].settings)
    traffic = _traffic(projects[0], production, 2, 1.0, 1.0, 1.0, 3)  # one plan and one start for both runs
    now = datetime.now(timezone.utc)
    outcomes = []
    for project in projects:
        _send(project, traffic)
        outcomes.append(_outcome(project, now))
    first, second = outcomes
    assert first["counts"] == second["counts"] and first["counts"][1] > 20, first["counts"]
    # the production rows the challenger trains on, in their order (the prepare stage splits them by position)
    pd.testing.assert_frame_equal(first["production"], second["production"])
    pd.testing.assert_frame_equal(first["recent"], second["recent"])
    # the patients the two models are compared on
    pd.testing.assert_frame_equal(first["holdout"], second["holdout"])
    assert first["window"] == second["window"]
    _same_figures(first["values"], second["values"])
