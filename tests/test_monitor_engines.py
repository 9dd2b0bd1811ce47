"""Monitoring gives the same figures whatever computes them: incrementally or from scratch, on the local or the Dask
engine, from a SQLite or a PostgreSQL log, from rows or blocks."""

import json

import numpy as np
import pandas as pd
import pytest
from test_predlog import postgres_server, postgres_url  # noqa: F401  (the private PostgreSQL cluster's fixtures)

from lifecycle.alerts import parse_kpis
from lifecycle.monitoring import update_windows
from lifecycle.serving.predlog import open_log
from lifecycle.train import reference_statistics

NUMERIC = ["age", "chol"]
START = pd.Timestamp("2024-05-06", tz="UTC")


def _features(rng, rows, drifted=False):
    frame = pd.DataFrame(
        {
            "age": rng.normal(60 if drifted else 55, 9, rows),
            "chol": rng.normal(240, 40, rows),
            "sex": rng.choice(["f", "m"], rows, p=[0.3, 0.7]),
        }
    )
    if drifted:
        frame.loc[rng.random(rows) < 0.5, "chol"] = np.nan
    return frame


def _reference():
    rng = np.random.default_rng(3)
    train = _features(rng, 2000)
    scores = rng.beta(2, 3, 2000)
    return reference_statistics(train, NUMERIC, ["sex"], scores, (rng.random(2000) < scores).astype(int))


REFERENCE = _reference()
KPIS = parse_kpis("missed_per_week: fn / weeks")


def _update(folder, log, **options):
    return update_windows(folder, log, lambda version: (REFERENCE, 0.5), "day", ["sex"], KPIS, n_boot=30, **options)


def _fill(log, day, rows, seed, as_block, version=1):
    "A day of predictions (rows or one block of them) and labels for half of them two days later."
    rng = np.random.default_rng(seed)
    features = _features(rng, rows, drifted=day >= 2)
    scores = rng.beta(2, 3, rows)
    ids = [f"r{day:02d}{seed:04d}{i:05d}" for i in range(rows)]  # the same order under any collation
    when = START + pd.Timedelta(days=day, hours=seed % 20)
    if as_block:
        log.record_many(ids, scores, (scores >= 0.5).astype(int), features, version, "batch", time=when)
    else:
        log.record(
            [
                {
                    "request_id": ids[i],
                    "time": when + pd.Timedelta(seconds=i),
                    "model_version": version,
                    "channel": "online",
                    "score": float(scores[i]),
                    "decision": int(scores[i] >= 0.5),
                    "features": {key: (None if pd.isna(value) else value) for key, value in features.iloc[i].items()},
                }
                for i in range(rows)
            ]
        )
    for i in range(0, rows, 2):
        log.record_label(ids[i], int(rng.random() < scores[i]), when + pd.Timedelta(days=2))
    log.record_rejections(
        [("out_of_range", "chol", seed, when), ("with_request", "", rows // 50, when)],  # refused records, counted
        "batch" if as_block else "online",
        version,
    )
    log.flush()


STEPS = [
    (0, 120, 1, False),
    (0, 80, 2, True),
    (1, 150, 3, False),
    (2, 100, 4, True),
    (2, 60, 5, False),
    (3, 90, 6, True),
]


def _stored(folder):
    "The windows table and every window's details, as stored."
    windows = pd.read_parquet(folder / "windows.parquet")
    details = {path.name: json.loads(path.read_text()) for path in sorted((folder / "details").glob("*.json"))}
    return windows, details


def _assert_same(one, other):
    pd.testing.assert_frame_equal(one[0], other[0], check_like=True)
    assert one[1] == other[1]


def test_incremental_updates_equal_one_update_from_scratch(tmp_path):
    with open_log(str(tmp_path / "log.sqlite"), tmp_path) as log:
        for step in STEPS:
            _fill(log, *step)
            _update(tmp_path / "incremental", log)
        _update(tmp_path / "scratch", log)
    incremental, scratch = _stored(tmp_path / "incremental"), _stored(tmp_path / "scratch")
    assert len(scratch[0]) == 4 and scratch[0]["labeled"].sum() > 0 and scratch[0]["drift_share"].max() > 0
    assert {"volume.online", "volume.batch"} <= set(scratch[0].columns)  # operations: volume by channel
    refused = scratch[0].set_index("window")  # operations: refused records by reason, counted from the log's counts
    assert refused["rejected.out_of_range"].tolist() == [1 + 2, 3, 4 + 5, 6] and refused["rejected"].sum() == 21 + 10
    assert refused["rejected_share"].iloc[0] == (3 + 3) / (
        3 + 3 + 200
    )  # day 0: 200 scored, 3 out of range, 3 refused with their request
    _assert_same(incremental, scratch)


def test_dask_engine_gives_the_same_figures(tmp_path):
    with open_log(str(tmp_path / "log.sqlite"), tmp_path) as log:
        for step in STEPS[:4]:
            _fill(log, *step)
        local = _update(tmp_path / "local", log)
        dask = _update(tmp_path / "dask", log, engine="dask")
        _fill(log, *STEPS[4])
        _fill(log, *STEPS[5])
        local_next = _update(tmp_path / "local", log)
        dask_next = _update(tmp_path / "dask", log, engine="dask")  # incrementally on Dask too: two windows touched
        assert local_next["touched"] == dask_next["touched"] == ["v1_2024-05-08", "v1_2024-05-09"]
        _assert_same(_stored(tmp_path / "local"), _stored(tmp_path / "dask"))
        log.record_label(
            "r020004" + "00001", 1, START + pd.Timedelta(days=9)
        )  # a late label: one window, computed in this process
        log.flush()
        local_last = _update(tmp_path / "local", log)
        dask_last = _update(tmp_path / "dask", log, engine="dask")
    assert local["touched"] == dask["touched"] and local_last["touched"] == dask_last["touched"] == ["v1_2024-05-08"]
    _assert_same(_stored(tmp_path / "local"), _stored(tmp_path / "dask"))
    with pytest.raises(Exception, match="unknown monitoring engine"):
        _update(tmp_path / "other", None, engine="spark")


def test_postgres_log_gives_the_same_figures_as_sqlite(postgres_url, tmp_path):  # noqa: F811
    with open_log(str(tmp_path / "log.sqlite"), tmp_path) as sqlite, open_log(postgres_url, tmp_path) as postgres:
        for step in STEPS:
            for log in (sqlite, postgres):
                _fill(log, *step)
            _update(tmp_path / "sqlite-incremental", sqlite)
            _update(tmp_path / "postgres-incremental", postgres)
        assert postgres.count() == sqlite.count() == sum(step[1] for step in STEPS)
    _assert_same(_stored(tmp_path / "sqlite-incremental"), _stored(tmp_path / "postgres-incremental"))
