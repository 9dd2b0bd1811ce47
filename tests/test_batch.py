"""Batch scoring: the column checker (the contract's check_frame) agrees with check_records, accounting is exact, scores
are the pipeline's, both engines agree."""

import argparse
import math
import os

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_predlog import postgres_server, postgres_url  # noqa: F401  (the real PostgreSQL fixtures)

from lifecycle.contract import error_reason
from lifecycle.registry import Registry, register, set_alias
from lifecycle.serving.batch import add_batch_command, score_file
from lifecycle.serving.predlog import open_log
from lifecycle.serving.scoring import Scorer, ServingSpec, check_frame, check_records
from lifecycle.train import build_pipeline

FEATURES = ["age", "chol", "sex", "color"]
META = {
    "features": {"numeric": ["age", "chol"], "categorical": ["sex", "color"]},
    "threshold": 0.4,
    "schema": {
        "columns": {
            "age": {"kind": "numeric", "min": 1.0, "max": 120.0},
            "chol": {"kind": "numeric", "min": 80.0, "max": 700.0},
            "sex": {"kind": "category", "type": "number", "categories": [0.0, 1.0]},
            "color": {"kind": "category", "type": "text", "categories": ["blue", "red"]},
        }
    },
    "settings": {
        "prepare": {"recode": "sex: m -> 1, male -> 1, f -> 0\ncolor: r -> red", "missing_values": "chol: 0"},
        "data": {"id": "id"},
    },
}
SPEC = ServingSpec.from_meta({**META, "version": 1, "sha256": "ab" * 32})


def _training_rows(n=400, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.uniform(20, 80, n).round(),
            "chol": rng.uniform(100, 400, n).round(),
            "sex": rng.integers(0, 2, n).astype(float),
            "color": rng.choice(["blue", "red"], n).astype(object),
        }
    )
    frame.loc[::7, "chol"] = np.nan
    frame.loc[::11, "color"] = np.nan
    labels = (frame["age"] + 40 * frame["sex"] + rng.normal(0, 10, n) > 70).astype(int)
    return frame, labels


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "A project folder whose registry holds a small gradient boosting champion."
    root = tmp_path_factory.mktemp("batch")
    frame, labels = _training_rows()
    model = build_pipeline("hist_gradient_boosting", ["age", "chol"], ["sex", "color"], 0).fit(frame, labels)
    registry = Registry(root)
    set_alias(registry, "champion", register(registry, model, META), "test")
    (root / "settings.ini").write_text("[data]\nsources = a: in.csv\ntarget = num\npositive = 1\n")
    return root


def _corrupted(n=500, seed=1):
    "Rows as a user's file holds them: most fine (some with missing values), some broken in every way."
    frame, _ = _training_rows(n, seed)
    frame = frame.astype({"age": object, "chol": object, "sex": object})
    frame["id"] = [f"patient-{i}" for i in range(n)]
    frame["hospital"] = "va"
    frame.loc[5, "age"] = 300  # out of range
    frame.loc[6, "sex"] = 7.0  # unknown category
    frame.loc[7, "color"] = "green"  # unknown text category
    frame.loc[8, "age"] = "fifty"  # not a number
    frame.loc[9, "sex"] = "M"  # recoded: fine
    frame.loc[10, "color"] = " RED "  # cleaned: fine
    frame.loc[11, "chol"] = 0.0  # "not measured": missing, fine
    frame.loc[12, ["age", "chol", "sex", "color"]] = [None, None, None, None]  # all missing: too many missing
    frame.loc[13, "chol"] = 5000  # out of range
    return frame, {
        5: "out_of_range:age",
        6: "unknown_category:sex",
        7: "unknown_category:color",
        8: "wrong_type:age",
        12: "too_many_missing",
        13: "out_of_range:chol",
    }


def _typed(frame):
    "The rows as a Parquet file types them: row 8's text age missing, row 9's sex a number."
    frame = frame.copy()
    frame.loc[8, "age"], frame.loc[9, "sex"] = None, 1.0
    return frame.astype({"age": float, "chol": float, "sex": float})


def _expected_scores(root, frame):
    "The pipeline's offline scores of the good rows, from check_records (not check_frame)."
    scorer = Scorer.from_registry(root)
    records = [
        {
            name: (None if value is None or (isinstance(value, float) and math.isnan(value)) else value)
            for name, value in row.items()
        }
        for row in frame[FEATURES].astype(object).to_dict("records")
    ]
    rows, _ = check_records(records, scorer.spec)
    good = [row for row in rows if row is not None]
    return scorer.model.predict_proba(scorer.frame(good))[:, 1]


# --- the column checker agrees with check_records ----------------------------------------------


def _reason(errors, index):
    first = next((e for e in errors if e["loc"][1] == index), None)
    return "" if first is None else error_reason(first)


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _assert_agrees(records, frame):
    rows, errors = check_records(records, SPEC)
    features, reasons = check_frame(frame, SPEC)
    assert reasons.tolist() == [_reason(errors, i) for i in range(len(records))]
    kept = [row for row in rows if row is not None]
    got = features.astype(object).values.tolist()
    assert len(kept) == len(got)
    for want, have in zip(kept, got):
        assert all(
            _same(
                float(w) if isinstance(w, (int, float)) and not isinstance(w, bool) and not isinstance(w, str) else w, h
            )
            for w, h in zip(want, have)
        ), (want, have)


# NaN is left out: in a JSON record it is refused (send null), in a frame it is the missing value
_number = st.one_of(
    st.none(),
    st.integers(-10, 1000),
    st.floats(allow_nan=False, allow_infinity=True),
    st.booleans(),
    st.sampled_from(
        [0, 0.0, 1, 1.0, 50, 120.0, 121, "M", " male ", "f", "F ", "x", "54", "", "nan", "0.1k", "1,200", "?"]
    ),
)
_text = st.one_of(
    st.none(),
    st.integers(0, 2),
    st.floats(allow_nan=False),
    st.booleans(),
    st.sampled_from(["red", " RED ", "Blue", "r", "R", "green", "", "blue "]),
)
_record = st.fixed_dictionaries({"age": _number, "chol": _number, "sex": _number, "color": _text})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_record, min_size=0, max_size=30))
def test_check_frame_agrees_with_check_records(records):
    "Objects as JSON gives them: same rows rejected, for the same first rule, same values kept."
    _assert_agrees(records, pd.DataFrame(records, columns=FEATURES, dtype=object))


_float = st.one_of(
    st.none(), st.floats(-10, 1000, allow_nan=False), st.sampled_from([0.0, 1.0, 120.0, 121.0, math.inf, -math.inf])
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(_float, _float, _float, st.sampled_from([None, "red", " Blue", "green"])), min_size=1, max_size=30
    )
)
def test_check_frame_on_typed_columns(rows):
    "A Parquet file's typed columns, where NaN is the missing value: the same verdicts as the records with null."
    records = [dict(zip(FEATURES, row)) for row in rows]
    frame = pd.DataFrame(
        {
            "age": [r["age"] for r in records],
            "chol": [r["chol"] for r in records],
            "sex": [r["sex"] for r in records],
            "color": pd.Series([r["color"] for r in records], dtype=object),
        }
    ).astype({"age": float, "chol": float, "sex": float})
    _assert_agrees(records, frame)


def test_absent_column_rejects_every_row():
    frame = pd.DataFrame({"age": [50.0], "sex": [1.0], "color": ["red"]})
    assert check_frame(frame, SPEC)[1].tolist() == ["missing:chol"]


# --- files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_accounting_and_scores(project, tmp_path, kind):
    frame, broken = _corrupted()
    source = tmp_path / f"in.{kind}"
    if kind == "parquet":  # Parquet columns are typed: the numbers as numbers (text in a number column: its own test)
        frame, broken = _typed(frame), {row: reason for row, reason in broken.items() if row != 8}
        frame.to_parquet(source, index=False)
    else:
        frame.to_csv(source, index=False)
    output = tmp_path / f"out.{kind}"
    summary = score_file(project, source, output, chunk_rows=64, log=False, progress=False)
    assert summary["rows_in"] == len(frame) == summary["rows_scored"] + summary["rows_rejected"]
    assert summary["rows_rejected"] == len(broken)
    read = (
        pd.read_parquet
        if kind == "parquet"
        else (lambda path: pd.read_csv(path, float_precision="round_trip", dtype={"id": str}))
    )
    scored, rejected = read(output), read(tmp_path / f"out.rejects.{kind}")
    assert list(scored.columns) == list(frame.columns) + ["score", "decision", "model_version"]
    assert list(rejected.columns) == list(frame.columns) + ["_row", "reason"]
    assert dict(zip(rejected["_row"], rejected["reason"])) == broken
    assert scored["id"].tolist() == [f"patient-{i}" for i in range(len(frame)) if i not in broken]
    assert np.array_equal(scored["score"].to_numpy(), _expected_scores(project, frame.drop(index=list(broken))))
    assert (scored["decision"] == (scored["score"] >= 0.4).astype(int)).all()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_text_in_a_parquet_number_column(project, tmp_path):
    """A Parquet string column where numbers belong: text that reads as a number is that number (as prepare reads it), a
    word is refused."""
    pd.DataFrame(
        {"age": ["54", "fifty"], "chol": [200.0, 250.0], "sex": ["m", "1"], "color": ["red", "blue"]}
    ).to_parquet(tmp_path / "in.parquet")
    summary = score_file(project, tmp_path / "in.parquet", tmp_path / "out.parquet", log=False, progress=False)
    assert summary["reasons"] == {"wrong_type:age": 1}


def test_deterministic_ids(project, tmp_path):
    frame, broken = _corrupted(200, seed=3)
    _typed(frame).to_parquet(tmp_path / "in.parquet", index=False)
    log_file = tmp_path / "log.sqlite"
    first = score_file(
        project, tmp_path / "in.parquet", tmp_path / "out.parquet", log_url=str(log_file), chunk_rows=50, progress=False
    )
    with open_log(str(log_file), project) as log:
        assert log.count("batch") == first["rows_scored"] == first["logged"] == 200 - (len(broken) - 1)
        ids = set(log.predictions()["request_id"])
    score_file(
        project, tmp_path / "in.parquet", tmp_path / "out.parquet", log_url=str(log_file), chunk_rows=77, progress=False
    )
    with open_log(str(log_file), project) as log:
        assert log.count("batch") == first["rows_scored"]
        logged = log.predictions()
    assert set(logged["request_id"]) == ids
    scored = pd.read_parquet(tmp_path / "out.parquet")
    assert np.array_equal(np.sort(logged["score"].to_numpy()), np.sort(scored["score"].to_numpy()))
    assert logged["id_hash"].notna().all() and not logged["id_hash"].str.startswith("patient").any()


def test_failed_run_leaves_no_output(project, tmp_path, monkeypatch):
    frame, _ = _corrupted(300)
    _typed(frame).to_parquet(tmp_path / "in.parquet", index=False)
    calls = []
    original = Scorer.frame_scores

    def failing(scorer, features):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return original(scorer, features)

    monkeypatch.setattr(Scorer, "frame_scores", failing)
    with pytest.raises(RuntimeError):
        score_file(project, tmp_path / "in.parquet", tmp_path / "out.parquet", chunk_rows=50, log=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


# --- the Dask engine --------------------------------------------------------------------------


def test_dask_engine_matches_local(project, tmp_path):
    from distributed import LocalCluster

    frame, broken = _corrupted(3000, seed=4)
    frame = _typed(frame)
    frame.to_parquet(tmp_path / "in.parquet", index=False, row_group_size=700)
    frame.to_csv(tmp_path / "in.csv", index=False)
    local = score_file(project, tmp_path / "in.parquet", tmp_path / "local.parquet", log=False, progress=False)
    expected = pd.read_parquet(tmp_path / "local.parquet")
    # the default: a LocalCluster of its own
    done = score_file(
        project,
        tmp_path / "in.parquet",
        tmp_path / "dask.parquet",
        engine="dask",
        log_url=str(tmp_path / "log.sqlite"),
        progress=False,
    )
    for key in ("rows_in", "rows_scored", "rows_rejected", "reasons", "model_version"):
        assert done[key] == local[key], key
    assert (tmp_path / "dask.parquet").is_dir()
    scored = pd.read_parquet(tmp_path / "dask.parquet")
    assert scored.drop(columns=["score"]).astype(str).equals(expected.drop(columns=["score"]).astype(str))
    assert np.array_equal(scored["score"].to_numpy(), expected["score"].to_numpy())
    rejected = pd.read_parquet(tmp_path / "dask.rejects.parquet").sort_values("_row")
    assert rejected["_row"].tolist() == pd.read_parquet(tmp_path / "local.rejects.parquet")["_row"].tolist()
    with open_log(str(tmp_path / "log.sqlite"), project) as log:
        assert log.count("batch") == done["logged"] == local["rows_scored"]
    # a scheduler address (as for a real cluster); CSV in and out
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        csv = score_file(
            project,
            tmp_path / "in.csv",
            tmp_path / "dask.csv",
            engine="dask",
            scheduler=cluster.scheduler_address,
            log=False,
            progress=False,
        )
    assert (csv["rows_in"], csv["rows_scored"], csv["reasons"]) == (
        local["rows_in"],
        local["rows_scored"],
        local["reasons"],
    )
    parts = sorted((tmp_path / "dask.csv").glob("part-*.csv"))
    scored_csv = pd.concat([pd.read_csv(part, float_precision="round_trip") for part in parts], ignore_index=True)
    assert np.array_equal(scored_csv["score"].to_numpy(), expected["score"].to_numpy())


# --- the command --------------------------------------------------------------------------------


def _command(*arguments):
    parser = argparse.ArgumentParser(prog="lifecycle")
    add_batch_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["batch", *map(str, arguments)])
    return args.handler(args)


def test_command_errors_are_one_line(project, tmp_path):
    from conftest import run_lifecycle

    settings = project / "settings.ini"
    code, _, _, stderr = run_lifecycle(
        "batch", "--settings", settings, "--input", tmp_path / "nope.parquet", "--output", tmp_path / "out.parquet"
    )
    assert code == 1 and stderr.count("\n") == 1 and "not found" in stderr
    pd.DataFrame({"age": [50.0], "sex": [1.0], "color": ["red"]}).to_parquet(tmp_path / "short.parquet")
    code, _, _, stderr = run_lifecycle(
        "batch", "--settings", settings, "--input", tmp_path / "short.parquet", "--output", tmp_path / "out.parquet"
    )
    assert code == 1 and stderr.count("\n") == 1 and "no column chol" in stderr
    assert not (tmp_path / "out.parquet").exists()
    code, _, _, stderr = run_lifecycle(
        "batch", "--settings", settings, "--input", tmp_path / "short.parquet", "--output", tmp_path / "out.xlsx"
    )
    assert code == 1 and "unknown format" in stderr


def test_a_binary_or_undecodable_file_is_one_line(project, tmp_path):
    "pyarrow fails to decode such a line for its handler; the user sees one line, never its 'Exception ignored'."
    from conftest import run_lifecycle

    (tmp_path / "binary.csv").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "late.csv").write_bytes(b"age,chol,sex,color\n" + b"50,200,1,red\n" * 30_000 + b"\xff\xfe\n")
    expected = {
        "binary.csv": f"lifecycle: {tmp_path / 'binary.csv'} is a binary file, not CSV text; "
        "give a CSV or Parquet file",
        "late.csv": f"lifecycle: {tmp_path / 'late.csv'}: line 30,002 holds bytes that are not UTF-8 text; "
        "save the file as UTF-8, or fix or remove that line, and run again",
    }
    for name, line in expected.items():
        code, _, _, stderr = run_lifecycle(
            "batch", "--settings", project / "settings.ini", "--input", tmp_path / name, "--output", tmp_path / "o.csv"
        )
        assert (code, stderr) == (1, line + "\n")
    assert not (tmp_path / "o.csv").exists()


def test_command_json(project, tmp_path, capsys):
    import json

    frame, broken = _corrupted(100)
    frame.to_csv(tmp_path / "in.csv", index=False)
    assert (
        _command(
            "--settings",
            project / "settings.ini",
            "--input",
            tmp_path / "in.csv",
            "--output",
            tmp_path / "out.parquet",
            "--no-log",
            "--json",
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert (summary["rows_in"], summary["rows_rejected"], summary["log"]) == (100, len(broken), False)


def test_a_run_that_fails_midway_leaves_nothing_in_the_log(project, tmp_path):
    """Chunks scored and logged before a malformed line: the run fails and writes no output, so its predictions leave
    the log."""
    frame, _ = _training_rows(8000, seed=3)
    lines = frame.to_csv(index=False).splitlines()
    lines[-50] += ",1,2,3"  # a malformed line near the end, in the last of several 64 KB blocks
    source = tmp_path / "broken.csv"
    source.write_text("\n".join(lines) + "\n")
    with open_log("", project) as log:
        before = log.count()
    with pytest.raises(Exception):
        score_file(project, source, tmp_path / "out.parquet", chunk_rows=100, progress=False)
    assert not (tmp_path / "out.parquet").exists()
    with open_log("", project) as log:
        assert log.count() == before
    frame.to_csv(source, index=False)  # the file fixed: the run succeeds and logs every row
    summary = score_file(project, source, tmp_path / "out.parquet", chunk_rows=100, progress=False)
    with open_log("", project) as log:
        assert log.count() == before + summary["logged"] and summary["logged"] > 0


# --- a run killed with SIGKILL --------------------------------------------------------------------


def _pending(read) -> int:
    "Predictions waiting in the pending tables (0 before the run made them)."
    try:
        return int(
            read(
                "SELECT (SELECT count(*) FROM pending_predictions) + (SELECT coalesce(sum(row_count), 0) FROM "
                "pending_blocks)"
            )[0][0]
        )
    except Exception:  # the tables are not there yet
        return 0


def _registered(read) -> bool:
    "Whether a batch run has registered in the log (its pending_runs row)."
    try:
        return int(read("SELECT count(*) FROM pending_runs")[0][0]) > 0
    except Exception:  # the table is not there yet
        return False


def _start_batch(project, tmp_path, log_url):
    "A `lifecycle batch` run on a file of 60,000 rows, 60 chunks, in a process group of its own."
    import subprocess

    from conftest import LIFECYCLE

    source = tmp_path / "big.csv"
    frame, _ = _training_rows(60_000, seed=7)
    frame.to_csv(source, index=False)
    command = [
        str(LIFECYCLE),
        "batch",
        "--settings",
        str(project / "settings.ini"),
        "--input",
        str(source),
        "--output",
        str(tmp_path / "out.parquet"),
        "--chunk-rows",
        "1000",
        "--log",
        log_url,
        "--quiet",
    ]
    return source, subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _kill(batch):
    import signal

    os.killpg(batch.pid, signal.SIGKILL)
    batch.wait(timeout=60)
    assert batch.returncode == -signal.SIGKILL


def _assert_killed_run_invisible_then_removed(project, tmp_path, store, log_url, source):
    from lifecycle.serving.predlog import PredictionLog, id_key

    reader = PredictionLog(store, id_key(project))  # reads without the cleaning open_log does
    assert reader.count() == 0 and len(reader.predictions()) == 0  # every reader: nothing of the killed run
    assert _pending(store.read) > 0 and store.read("SELECT count(*) FROM pending_runs")[0][0] == 1
    reader.close()
    with open_log(log_url, project) as log:  # the next open removes the dead run's pending rows
        assert _pending(store.read) == 0 and store.read("SELECT count(*) FROM pending_runs")[0][0] == 0
        assert log.count() == 0
    assert not (tmp_path / "out.parquet").exists()
    # a run that completes logs every row it scored
    summary = score_file(project, source, tmp_path / "out.parquet", chunk_rows=20_000, log_url=log_url, progress=False)
    with open_log(log_url, project) as log:
        assert log.count("batch") == summary["rows_scored"] == summary["logged"] > 50_000
        assert _pending(store.read) == 0


def test_a_batch_run_killed_with_sigkill_leaves_no_visible_rows(project, tmp_path):
    """SQLite: the run writes pending blocks; holding the database's write lock once some exist, the run cannot publish
    before its kill."""
    import sqlite3
    import time

    from lifecycle.serving.predlog import SQLiteStore

    log_path = tmp_path / "log.sqlite"
    source, batch = _start_batch(project, tmp_path, str(log_path))
    try:
        watcher = sqlite3.connect(log_path, timeout=60, isolation_level=None)
        deadline = time.monotonic() + 300
        while not _registered(
            lambda sql: watcher.execute(sql).fetchall()
        ):  # no write lock taken before the run has started:
            assert batch.poll() is None, (
                f"the run ended before it started: {batch.stderr.read()}"
            )  # its start is not the test
            assert time.monotonic() < deadline, "the run did not start in 5 minutes"
            time.sleep(0.05)
        while True:
            assert batch.poll() is None, f"the run ended before any of its rows was seen: {batch.stderr.read()}"
            watcher.execute("BEGIN IMMEDIATE")  # while it is held, the run cannot publish
            if _pending(lambda sql: watcher.execute(sql).fetchall()) > 0:
                break
            watcher.execute("ROLLBACK")
            assert time.monotonic() < deadline, "the run wrote no pending rows in 5 minutes"
            time.sleep(0.01)
        _kill(batch)
        watcher.execute("ROLLBACK")
        watcher.close()
    finally:
        if batch.poll() is None:
            _kill(batch)
    _assert_killed_run_invisible_then_removed(project, tmp_path, SQLiteStore(log_path), str(log_path), source)
    assert list((tmp_path / ".log.sqlite.runs").iterdir()) == []  # the dead run's lock file went with it


def test_a_batch_run_killed_with_sigkill_leaves_no_visible_rows_on_postgresql(project, tmp_path, postgres_url):
    """PostgreSQL: the test holds the block writers' advisory lock, so the run writes pending rows but cannot publish
    them."""
    import time

    import psycopg

    from lifecycle.serving.predlog import PostgresStore

    store = PostgresStore(postgres_url)
    with psycopg.connect(postgres_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(7319002)")
        source, batch = _start_batch(project, tmp_path, postgres_url)
        try:
            deadline = time.monotonic() + 300
            while _pending(store.read) == 0:
                assert batch.poll() is None, f"the run ended before any of its rows was seen: {batch.stderr.read()}"
                assert time.monotonic() < deadline, "the run wrote no pending rows in 5 minutes"
                time.sleep(0.05)
            _kill(batch)
        finally:
            if batch.poll() is None:
                _kill(batch)
    with psycopg.connect(
        postgres_url, autocommit=True
    ) as admin:  # the killed process's sessions end as the server sees their sockets close
        deadline = time.monotonic() + 120
        while admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'lifecycle-predlog'"
        ).fetchone()[0]:
            assert time.monotonic() < deadline, "the killed run's sessions did not end"
            time.sleep(0.05)
    _assert_killed_run_invisible_then_removed(project, tmp_path, store, postgres_url, source)
