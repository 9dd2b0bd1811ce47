"""The monitor counts every prediction exactly once, whatever the arrival order: its cursor is the log's commit
sequence, one update runs at a time, and a row it cannot read is counted with its reason, never a crash or a reset."""

import json
import sqlite3
import subprocess
import threading

import numpy as np
import pandas as pd
import pytest
from conftest import LIFECYCLE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression

from lifecycle.core import open_project
from lifecycle.monitoring import monitor_project, update_windows
from lifecycle.registry import Registry, register, set_alias
from lifecycle.serving.predlog import Journal, PendingRun, journal_folder, open_log, prediction_row, replay_journals
from lifecycle.train import reference_statistics

MONDAY = pd.Timestamp("2024-05-06", tz="UTC")
NUMERIC = ["x0", "x1"]
COMPARED = [
    "window",
    "model_version",
    "predictions",
    "positives",
    "labeled",
    "first_event",
    "last_event",
    "tp",
    "fp",
    "fn",
    "tn",
]


@pytest.fixture
def project(tmp_path):
    "A project whose champion (version 1) has a reference; daily windows, no alert rules."
    rng = np.random.default_rng(3)
    train = pd.DataFrame({name: rng.normal(0, 1, 2000) for name in NUMERIC})
    labels = (rng.random(2000) < 1 / (1 + np.exp(-train["x0"]))).astype(int)
    model = LogisticRegression().fit(train, labels)
    reference = reference_statistics(train, NUMERIC, [], model.predict_proba(train)[:, 1], labels)
    registry = Registry(tmp_path)
    version = register(
        registry,
        model,
        {"threshold": 0.5, "features": {"numeric": NUMERIC, "categorical": []}},
        {"reference.json": json.dumps(reference)},
    )
    set_alias(registry, "champion", version, "test")
    (tmp_path / "settings.ini").write_text(
        "[data]\nsources = a: a.csv\ntarget = y\npositive = 1\n\n[monitor]\nwindow = day\nbootstrap = 0\n"
    )
    return tmp_path


def _online(log, prefix, count, day, seed=0):
    "`count` online predictions with event times on `day` (days after MONDAY), logged now."
    rng = np.random.default_rng(seed)
    scores = rng.random(count)
    log.record(
        [
            {
                "request_id": f"{prefix}{i}",
                "time": MONDAY + pd.Timedelta(days=day, minutes=i),
                "model_version": 1,
                "channel": "online",
                "score": float(scores[i]),
                "decision": int(scores[i] >= 0.5),
                "features": {"x0": float(rng.normal()), "x1": float(rng.normal())},
            }
            for i in range(count)
        ]
    )
    assert log.flush(timeout=30)


def _batch(root, prefix, count, day, seed=0):
    "A batch run that scored `count` predictions on `day` (a time long before now): pending until published."
    rng = np.random.default_rng(seed)
    log = open_log("", root)
    run = PendingRun(log.store)
    log.close()
    scored = open_log("", root, run=run.run_id)
    scores = rng.random(count)
    scored.record_many(
        [f"{prefix}{i}" for i in range(count)],
        scores,
        (scores >= 0.5).astype(int),
        pd.DataFrame({"x0": rng.normal(size=count), "x1": rng.normal(size=count)}),
        1,
        "batch",
        time=MONDAY + pd.Timedelta(days=day),
    )
    assert scored.flush(timeout=30)
    scored.close()
    return run


def _monitor(root, *args):
    "`lifecycle monitor --json` in the project: (exit code, parsed output, stderr)."
    done = subprocess.run(
        [str(LIFECYCLE), "monitor", "--json", "--settings", str(root / "settings.ini"), *args],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
    )
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else None), done.stderr


def _rebuilt(root, folder="rebuilt"):
    "The windows of the whole log computed from scratch, in a folder of their own."
    with open_log("", root) as log:
        return update_windows(root / folder, log, _references(root), "day", n_boot=0)["windows"]


def _references(root):
    reference = json.loads(next((root / "registry" / "versions").glob("*/reference.json")).read_text())
    return lambda version: (reference, 0.5)


def _same_windows(stored: pd.DataFrame, rebuilt: pd.DataFrame) -> None:
    "Equal counts and figures, window by window (figures up to the rounding of sums taken in another order)."
    stored = stored.sort_values("window", ignore_index=True)
    rebuilt = rebuilt.sort_values("window", ignore_index=True)
    assert stored["window"].tolist() == rebuilt["window"].tolist()
    pd.testing.assert_frame_equal(
        stored[[c for c in COMPARED if c in stored]], rebuilt[[c for c in COMPARED if c in rebuilt]], check_dtype=False
    )
    numbers = [
        name for name in rebuilt.columns if name in stored.columns and pd.api.types.is_float_dtype(rebuilt[name])
    ]
    np.testing.assert_allclose(
        stored[numbers].to_numpy(dtype=float), rebuilt[numbers].to_numpy(dtype=float), rtol=1e-9, equal_nan=True
    )


def test_a_batch_published_behind_the_cursor_is_counted(project):
    """A batch scored on Tuesday publishes after the monitor read Wednesday's online predictions: the next monitor
    counts it."""
    with open_log("", project) as log:
        _online(log, "mon-", 50, 0)
    run = _batch(project, "batch-", 300, 1)  # scored before what follows, published after it
    with open_log("", project) as log:
        _online(log, "wed-", 40, 2, seed=1)
    code, first, stderr = _monitor(project)
    assert code == 0, stderr
    assert first["new_predictions"] == 90
    assert run.publish() == 300
    code, second, stderr = _monitor(project)
    assert code == 0, stderr
    assert second["new_predictions"] == 300  # the old cursor on scoring time said 0 here
    windows = pd.read_parquet(project / "monitoring" / "windows.parquet")
    assert windows.set_index("window")["predictions"].to_dict() == {
        "v1_2024-05-06": 50,
        "v1_2024-05-07": 300,
        "v1_2024-05-08": 40,
    }
    _same_windows(windows, _rebuilt(project))
    code, third, _ = _monitor(project)
    assert (code, third["new_predictions"]) == (0, 0)


def test_three_concurrent_monitors_after_a_batch_equal_a_rebuild(project):
    """Three `lifecycle monitor --json` at once after a batch: they queue on the lock; the windows equal a rebuild, none
    fails."""
    with open_log("", project) as log:
        _online(log, "mon-", 30, 0)
    assert _monitor(project)[0] == 0
    run = _batch(project, "batch-", 20_000, 1)
    assert run.publish() == 20_000
    with open_log("", project) as log:
        for i in range(20):
            log.record_label(f"batch-{i}", i % 2, MONDAY + pd.Timedelta(days=9))
        assert log.flush(timeout=30)
    monitors = [
        subprocess.Popen(
            [str(LIFECYCLE), "monitor", "--json", "--settings", str(project / "settings.ini")],
            cwd=project,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = [(monitor.wait(timeout=600), *monitor.communicate()) for monitor in monitors]
    for code, stdout, stderr in results:
        assert code == 0 and "Traceback" not in stderr, stderr
    outputs = [json.loads(stdout) for _, stdout, _ in results]
    assert sorted(output["new_predictions"] for output in outputs) == [0, 0, 20_000]  # the batch counted once
    assert sorted(output["new_labels"] for output in outputs) == [0, 0, 20]
    assert all(output["latest"]["values"]["predictions"] == 20_000 for output in outputs)  # none saw a partial window
    windows = pd.read_parquet(project / "monitoring" / "windows.parquet")
    assert windows.set_index("window")["predictions"].to_dict() == {"v1_2024-05-06": 30, "v1_2024-05-07": 20_000}
    _same_windows(windows, _rebuilt(project))


MALFORMED = {  # a row another tool wrote into the log: (table, SQL values), and the reason the monitor gives
    "text score": (
        "predictions",
        "('bad', '2024-05-07T09:00:00Z', 1, 'online', 'high', 1, NULL, '{}', NULL)",
        "not_a_number",
        "score",
    ),
    "unparseable time": (
        "predictions",
        "('bad', 'last tuesday', 1, 'online', 0.5, 1, NULL, '{}', NULL)",
        "unreadable_time",
        "time",
    ),
    "year-9999 time": (
        "predictions",
        "('bad', '9999-12-31T00:00:00Z', 1, 'online', 0.5, 1, NULL, '{}', NULL)",
        "time_out_of_range",
        "time",
    ),
    "broken features JSON": (
        "predictions",
        "('bad', '2024-05-07T09:00:00Z', 1, 'online', 0.5, 1, NULL, '{\"x0\": ', NULL)",
        "unreadable_json",
        "features",
    ),
    "non-UTF-8 id": (
        "predictions",
        "(CAST(X'62ff' AS TEXT), '2024-05-07T09:00:00Z', 1, 'online', 0.5, 1, NULL, '{}', NULL)",
        "not_utf8",
        "request_id",
    ),
    "non-UTF-8 channel": (
        "predictions",
        "('bad', '2024-05-07T09:00:00Z', 1, CAST(X'6fff' AS TEXT), 0.5, 1, NULL, '{}', NULL)",
        "not_utf8",
        "channel",
    ),
    "text label": ("labels", "('mon-1', 'positive', '2024-05-09T00:00:00Z', NULL)", "not_a_number", "label"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_row_is_counted_with_its_reason_and_the_state_is_kept(project, kind):
    """One bad row among good ones: counted with its reason (never its value), no traceback, state kept, the next run
    fine."""
    table, values, reason, field = MALFORMED[kind]
    with open_log("", project) as log:
        _online(log, "mon-", 30, 0)
    assert (
        monitor_project(open_project(project / "settings.ini"))["exit_code"] == 0
    )  # in this process: the command's own runs follow
    stored = {
        name: (project / "monitoring" / name).exists()
        for name in ("state.json", "windows.parquet", "rows", "ids", "details")
    }
    assert all(stored.values())
    columns = (
        "(request_id, time, model_version, channel, score, decision, id_hash, features, event_time)"
        if table == "predictions"
        else "(request_id, label, time, logged)"
    )
    with sqlite3.connect(project / "predictions.sqlite") as database:  # another tool, beside the log's own writer
        database.execute(f"INSERT INTO {table} {columns} VALUES {values}")
    with open_log("", project) as log:
        _online(log, "tue-", 20, 1, seed=1)
    code, result, stderr = _monitor(project)
    assert code == 0 and "Traceback" not in stderr, stderr
    assert result["new_predictions"] == 20 and not result["rebuilt"]
    assert result["log_rows_refused"] == [{"table": table, "reason": reason, "field": field, "count": 1}]
    said = [line for line in result["statements"] if "could not be read and were left out" in line]
    assert len(said) == 1 and f"{reason}: {field}" in said[0]
    assert not any(
        value in said[0] for value in ("high", "last tuesday", "9999", "positive", "bad", "x0")
    )  # never the value
    assert all((project / "monitoring" / name).exists() for name in stored)
    windows = pd.read_parquet(project / "monitoring" / "windows.parquet").set_index("window")["predictions"].to_dict()
    assert windows == {"v1_2024-05-06": 30, "v1_2024-05-07": 20}
    code, again, stderr = _monitor(project)
    assert (code, again["new_predictions"], again["rebuilt"]) == (0, 0, False), stderr
    assert again["log_rows_refused"][0]["count"] == 1  # counted once, not at every run


def test_an_old_log_gets_the_sequence_and_old_rows_are_counted_once(tmp_path):
    """A SQLite log made before the commit sequence: opened, it gets the column; its old rows count once, new rows after
    them."""
    with sqlite3.connect(
        tmp_path / "predictions.sqlite"
    ) as database:  # the tables as logs made them before the sequence
        database.execute(
            "CREATE TABLE predictions (request_id TEXT PRIMARY KEY, time TEXT NOT NULL, model_version INTEGER NOT "
            "NULL, "
            "channel TEXT NOT NULL, score REAL, decision INTEGER NOT NULL, id_hash TEXT, features TEXT NOT NULL, "
            "event_time TEXT)"
        )
        database.execute(
            "CREATE TABLE labels (request_id TEXT PRIMARY KEY, label INTEGER NOT NULL, time TEXT NOT NULL, logged TEXT)"
        )
        database.execute(
            "INSERT INTO predictions VALUES ('old', '2024-05-06T08:00:00Z', 1, 'online', 0.7, 1, NULL, '{\"x0\": "
            "1}', NULL)"
        )
    with open_log("", tmp_path) as log:
        columns = {
            row[1] for row in sqlite3.connect(tmp_path / "predictions.sqlite").execute("PRAGMA table_info(predictions)")
        }
        assert "seq" in columns
        first = update_windows(tmp_path / "monitoring", log, lambda version: (None, 0.5), "day", n_boot=0)
        _online(log, "new-", 5, 0)
        second = update_windows(tmp_path / "monitoring", log, lambda version: (None, 0.5), "day", n_boot=0)
    assert (first["new_predictions"], second["new_predictions"]) == (1, 5)
    assert second["windows"]["predictions"].tolist() == [6]


# --- any interleaving gives the windows of a rebuild
# --------------------------------------------------------------------

OPERATIONS = st.one_of(
    st.tuples(st.just("online"), st.integers(1, 15), st.integers(0, 4)),
    st.tuples(st.just("batch"), st.integers(1, 40), st.integers(0, 4)),  # a slow batch run: scored now, published later
    st.tuples(st.just("publish"), st.just(0), st.just(0)),  # the oldest open batch run publishes
    st.tuples(st.just("kill"), st.just(0), st.just(0)),  # the oldest open batch run dies: its rows never become visible
    st.tuples(st.just("journal"), st.integers(1, 10), st.integers(0, 4)),  # a server died with rows only in its journal
    st.tuples(st.just("replay"), st.just(0), st.just(0)),  # the next open replays the journals
    st.tuples(st.just("label"), st.integers(0, 200), st.integers(0, 1)),
    st.tuples(st.just("monitor"), st.just(0), st.just(0)),
    st.tuples(st.just("monitors"), st.integers(2, 3), st.just(0)),  # concurrent monitors
)


def _concurrent_monitors(root, log, count):
    errors = []

    def one():
        try:
            update_windows(root / "monitoring", log, lambda version: (None, 0.5), "day", n_boot=0)
        except Exception as error:  # reported below: a thread's exception would otherwise be lost
            errors.append(error)

    threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(operations=st.lists(OPERATIONS, min_size=3, max_size=12))
def test_any_interleaving_gives_the_windows_of_a_rebuild(tmp_path_factory, operations):
    """Online, batch (slow, killed), replayed journals, labels, single and concurrent monitors, in any order: the
    windows equal a rebuild."""
    root = tmp_path_factory.mktemp("exact")
    log = open_log("", root)
    runs, issued, number = [], [], 0
    journals = journal_folder(root, log.store)
    for kind, size, day in operations:
        number += 1
        prefix = f"{kind}{number}-"
        if kind == "online":
            _online(log, prefix, size, day, seed=number)
            issued += [f"{prefix}{i}" for i in range(size)]
        elif kind == "batch":
            runs.append(_batch(root, prefix, size, day, seed=number))
            issued += [f"{prefix}{i}" for i in range(size)]
        elif kind in ("publish", "kill") and runs:
            run = runs.pop(0)
            run.publish() if kind == "publish" else run.abandon()
        elif kind == "journal":
            journal = Journal(journals)
            journal.append(
                [
                    prediction_row(
                        {
                            "request_id": f"{prefix}{i}",
                            "time": MONDAY + pd.Timedelta(days=day, seconds=i),
                            "model_version": 1,
                            "channel": "online",
                            "score": 0.25 + 0.5 * (i % 2),
                            "decision": i % 2,
                            "features": {"x0": float(i)},
                        },
                        lambda value: None,
                    )
                    for i in range(size)
                ]
            )
            journal.release(delete=False)  # the process died: its journal stays for the next open
            issued += [f"{prefix}{i}" for i in range(size)]
        elif kind == "replay":
            replay_journals(log.store, journals)
        elif kind == "label" and issued:
            log.record_label(issued[size % len(issued)], day, MONDAY + pd.Timedelta(days=8))
            assert log.flush(timeout=30)
        elif kind == "monitor":
            update_windows(root / "monitoring", log, lambda version: (None, 0.5), "day", n_boot=0)
        elif kind == "monitors":
            _concurrent_monitors(root, log, size)
    incremental = update_windows(root / "monitoring", log, lambda version: (None, 0.5), "day", n_boot=0)["windows"]
    rebuilt = update_windows(root / "rebuilt", log, lambda version: (None, 0.5), "day", n_boot=0)["windows"]
    log.close()
    for run in runs:
        run.abandon()
    if len(rebuilt) or len(incremental):
        _same_windows(incremental, rebuilt)


# --- PostgreSQL: the same, and a commit still in flight is never skipped
# ------------------------------------------------

from test_predlog import postgres_server, postgres_url  # noqa: E402,F401  (the fixtures: a server for the session, a database a test)


def test_postgres_a_commit_in_flight_is_waited_for_and_a_late_batch_counted(postgres_url, tmp_path):
    """A transaction that took its number before a later one committed: `settled_commit` waits for it, so the cursor
    never passes a row that is not visible yet. A batch published behind the cursor is counted; concurrent monitors
    queue."""
    import psycopg

    log = open_log(postgres_url, tmp_path)
    _online(log, "mon-", 10, 0)
    start = log.settled_commit()
    slow = psycopg.connect(postgres_url)  # not autocommit: its insert holds a number until it commits
    slow.execute(
        "INSERT INTO predictions (request_id, time, model_version, channel, score, decision, features) "
        "VALUES ('slow', '2024-05-06T05:00:00Z', 1, 'online', 0.9, 1, '{}')"
    )
    _online(log, "fast-", 3, 0, seed=1)  # numbered after 'slow', committed before it
    settled = []
    waiting = threading.Thread(target=lambda: settled.append(log.settled_commit()))
    waiting.start()
    with psycopg.connect(postgres_url, autocommit=True) as observer:  # until the monitor's lock request is seen waiting
        while not observer.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()[0]:
            waiting.join(timeout=0.05)
            assert waiting.is_alive(), "settled_commit returned while a numbered commit was in flight"
    slow.commit()
    slow.close()
    waiting.join(timeout=60)
    frame, refused = log.committed(after=start, upto=settled[0])
    assert sorted(frame["request_id"]) == ["fast-0", "fast-1", "fast-2", "slow"] and refused == []
    monitoring = tmp_path / "monitoring"
    assert update_windows(monitoring, log, lambda version: (None, 0.5), "day", n_boot=0)["new_predictions"] == 14
    run = PendingRun(log.store)
    with open_log(postgres_url, tmp_path, run=run.run_id) as batch:
        batch.record_many(
            [f"b{i}" for i in range(50)], np.full(50, 0.7), np.ones(50, int), None, 1, "batch", time=MONDAY
        )
    _online(log, "wed-", 5, 2, seed=2)
    assert update_windows(monitoring, log, lambda version: (None, 0.5), "day", n_boot=0)["new_predictions"] == 5
    assert run.publish() == 50
    _concurrent_monitors(tmp_path, log, 3)
    windows = update_windows(monitoring, log, lambda version: (None, 0.5), "day", n_boot=0)["windows"]
    assert windows.set_index("window")["predictions"].to_dict() == {"v1_2024-05-06": 64, "v1_2024-05-08": 5}
    _same_windows(
        windows, update_windows(tmp_path / "rebuilt", log, lambda version: (None, 0.5), "day", n_boot=0)["windows"]
    )
    log.close()
