"""The prediction log under load: SQLite read by another process while it is written, a drain on SIGTERM,
writer crashes, and PostgreSQL against a real server that the tests start and stop themselves."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import free_port

from lifecycle.core import LifecycleError
from lifecycle.serving.predlog import PredictionLog, SQLiteStore, id_key, open_log, pseudonymize
from lifecycle.serving.predlog.writer import log_position

REQUIRE_SERVICES = os.environ.get("LIFECYCLE_REQUIRE_SERVICES") == "1"


def predictions(count, start=0, channel="online"):
    "Predictions as a server would record them, each with a raw identifier that must never reach the database."
    return [
        {
            "request_id": f"r{n}",
            "time": f"2024-05-01T12:{n // 60 % 60:02d}:{n % 60:02d}Z",
            "model_version": 2,
            "channel": channel,
            "score": (n % 100) / 100,
            "decision": n % 2,
            "features": {"age": 30 + n % 50, "chol": None if n % 7 == 0 else 200 + n % 90, "oldpeak": float("nan")},
            "id": f"patient-{n}",
        }
        for n in range(start, start + count)
    ]


def record_from_threads(log, threads, chunks, chunk_size, pause=0.0):
    "Record `threads * chunks * chunk_size` predictions from several threads at once, as a server's workers do."

    def work(worker):
        for chunk in range(chunks):
            start = (worker * chunks + chunk) * chunk_size
            log.record(predictions(chunk_size, start=start, channel=("online", "batch", "stream")[worker % 3]))
            if pause:
                time.sleep(pause)

    workers = [threading.Thread(target=work, args=(worker,)) for worker in range(threads)]
    for worker in workers:
        worker.start()
    return workers


# --- SQLite -------------------------------------------------------------------------------------

READER = r"""
import sqlite3, sys, time
path, expected = sys.argv[1], int(sys.argv[2])
connection = sqlite3.connect(path, timeout=10)
print("ready", flush=True)
seen = []
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    count = connection.execute("SELECT count(*) FROM predictions").fetchone()[0]
    if not seen or count != seen[-1]:
        seen.append(count)
    if count >= expected:
        break
    time.sleep(0.003)
print(" ".join(map(str, seen)), flush=True)
"""


def test_sqlite_under_load_is_read_by_another_process(tmp_path):
    log = open_log("", tmp_path)
    threads, chunks, chunk_size = 4, 100, 50
    expected = threads * chunks * chunk_size
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(tmp_path / "predictions.sqlite"), str(expected)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert reader.stdout.readline().strip() == "ready"
    for worker in record_from_threads(log, threads, chunks, chunk_size, pause=0.003):
        worker.join()
    for n in range(0, expected, 3):
        log.record_label(f"r{n}", n % 2)
    assert log.flush(timeout=60)
    out, err = reader.communicate(timeout=90)
    seen = [int(count) for count in out.split()]
    assert reader.returncode == 0 and err == "", err
    assert seen[-1] == expected, seen
    assert seen == sorted(seen), seen  # a reader never sees rows vanish
    assert any(0 < count < expected for count in seen), f"the reader saw no count while the writer wrote: {seen}"
    assert log.count() == expected
    assert log.count("batch") == chunks * chunk_size  # worker 1 of 4
    assert len(log.labels()) == len(range(0, expected, 3))
    frame = log.predictions()
    assert frame["request_id"].is_unique and len(frame) == expected
    assert frame["oldpeak"].isna().all()  # NaN is stored as null
    log.close()
    assert log.errors == []
    assert b"patient-" not in b"".join(path.read_bytes() for path in tmp_path.glob("predictions.sqlite*"))


def test_sqlite_lock_held_by_another_process_costs_time_not_rows(tmp_path):
    path = tmp_path / "log.sqlite"
    log = PredictionLog(SQLiteStore(path, busy_timeout=0.05), id_key(tmp_path))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    log.record(predictions(300))
    deadline = time.monotonic() + 10
    while not log.errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert log.count() == 0 and log.pending == 300  # reading still works in WAL mode while the lock is held
    assert "database is locked" in log.errors[0], log.errors
    blocker.execute("ROLLBACK")
    assert log.flush(timeout=10)
    assert log.count() == 300
    log.close()
    assert all("patient" not in line for line in log.errors)


class _Crash(BaseException):
    "Not an Exception: the writer does not catch it, and its thread dies."


class CrashingStore(SQLiteStore):
    "Kills the writer thread on every `every`-th batch, before that batch is committed."

    def __init__(self, path, every):
        super().__init__(path)
        self.every = every
        self.calls = 0

    def write(self, connection, predictions, labels, blocks=()):
        self.calls += 1
        if self.calls % self.every == 0:
            raise _Crash()
        super().write(connection, predictions, labels, blocks)


def test_writer_thread_deaths_under_load_lose_nothing(tmp_path):
    log = PredictionLog(CrashingStore(tmp_path / "log.sqlite", every=4), id_key(tmp_path), batch_size=200)
    for worker in record_from_threads(log, threads=3, chunks=50, chunk_size=40, pause=0.001):
        worker.join()
    assert log.flush(timeout=30)
    assert log.count() == 3 * 50 * 40
    assert sum("writer thread stopped" in line for line in log.errors) >= 2, log.errors
    log.close()


SERVER = r"""
import signal, sys
from pathlib import Path
from lifecycle.serving.predlog import open_log
root, mode = Path(sys.argv[1]), sys.argv[2]
log = open_log("", root)
served = 0
stopping = False

def stop_after_request(signum, frame):  # what the server does: finish the request in flight, then close
    global stopping
    stopping = True

def close_now(signum, frame):  # close() inside the handler itself, interrupting record() anywhere
    log.close()
    (root / "served").write_text(f"{served} {log.pending}")
    sys.exit(0)

signal.signal(signal.SIGTERM, stop_after_request if mode == "flag" else close_now)
print("ready", flush=True)
while not stopping:
    log.record([{"request_id": f"r{served}", "time": "2024-05-01T12:00:00Z", "model_version": 1, "channel": "online",
                 "score": 0.5, "decision": 1, "features": {"age": 50}, "id": served}])
    served += 1
    if served == 1000:
        print("busy", flush=True)  # the test signals once this many are recorded, however slow the machine
pending = log.pending
log.close()
(root / "served").write_text(f"{served} {pending}")
"""


@pytest.mark.parametrize("mode", ["flag", "handler"])
def test_sigterm_drains_the_queue(tmp_path, mode):
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path), mode], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "ready"
    assert server.stdout.readline().strip() == "busy"
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0
    served, pending_at_stop = map(int, (tmp_path / "served").read_text().split())
    logged = open_log("", tmp_path).count()
    assert served >= 1000
    if mode == "flag":
        assert logged == served, (logged, served, pending_at_stop)
    else:  # the signal may land after a row is queued and before the loop counts it
        assert served <= logged <= served + 1, (logged, served, pending_at_stop)


# --- PostgreSQL ---------------------------------------------------------------------------------


def _postgres_bin():
    "The newest /usr/lib/postgresql/<version>/bin that holds initdb, or None."
    found = [path.parent for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    found.sort(key=lambda folder: int(folder.parent.name) if folder.parent.name.isdigit() else 0)
    return found[-1] if found else None


@pytest.fixture(scope="session")
def postgres_server():
    "A private PostgreSQL cluster in a temporary folder, for this test session only; yields its URL without a database."
    bindir = _postgres_bin()
    if bindir is None:
        message = (
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
            "install Debian's postgresql package (apt-get install postgresql)"
        )
        if REQUIRE_SERVICES:
            pytest.fail(f"{message}; LIFECYCLE_REQUIRE_SERVICES=1 requires it")
        pytest.skip(message)
    base = Path(tempfile.mkdtemp(prefix="lifecycle-pg-", dir="/tmp"))
    data, sockets, server_log = base / "data", base / "sockets", base / "server.log"
    sockets.mkdir()
    as_postgres = []
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        as_postgres = ["runuser", "-u", "postgres", "--"]
        for path in (base, sockets):
            shutil.chown(path, "postgres", "postgres")

    def run(*args):
        done = subprocess.run([*as_postgres, *map(str, args)], cwd=base, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = server_log.read_text() if server_log.exists() else ""
            raise RuntimeError(f"{Path(str(args[0])).name} failed:\n{done.stdout}\n{done.stderr}\n{log}")

    run(bindir / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    port = free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off -c max_connections=50"
    try:
        run(bindir / "pg_ctl", "-D", data, "-l", server_log, "-o", options, "-w", "-t", "60", "start")
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            cwd=base,
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    "A new, empty database for one test."
    import psycopg

    name = f"predlog_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server}/{name}"


def test_postgres_round_trip(postgres_url, tmp_path):
    log = open_log(postgres_url, tmp_path)
    log.record(predictions(120))
    log.record(predictions(10))  # retried requests: logged once
    log.record_label("r3", 1, "2024-05-02T08:00:00+02:00")
    log.record_label("r3", 0, "2024-05-02T09:00:00Z")  # a corrected label replaces the first
    log.record([{**predictions(1, start=500)[0], "features": {"note": "a\x00b", "big": 10**30}}])  # jsonb refuses NUL
    with pytest.raises(LifecycleError, match="'request_id'"):
        log.record([{**predictions(1)[0], "request_id": "r\x00"}])
    assert log.flush(timeout=30)
    assert log.count() == 121 and log.count("online") == 121 and log.pending == 0 and log.refused == 0
    assert log.predictions(since="2024-05-01T12:08:20Z")["note"].tolist() == ["a\ufffdb"]
    frame = log.predictions()
    assert list(frame.columns[:7]) == ["request_id", "time", "model_version", "channel", "score", "decision", "id_hash"]
    assert {"age", "chol", "oldpeak"} <= set(frame.columns)
    assert str(frame["time"].dt.tz) == "UTC"
    assert frame["id_hash"].iloc[0] == pseudonymize("patient-0", id_key(tmp_path))
    assert frame["oldpeak"].isna().all()
    assert len(log.predictions(since="2024-05-01T12:01:00Z")) == 60 + 1  # r60…r119 and r500
    assert log.predictions(limit=5)["request_id"].tolist() == [*(f"r{n}" for n in range(116, 120)), "r500"]
    labels = log.labels()
    assert labels[["request_id", "label"]].values.tolist() == [["r3", 0]]
    assert str(labels["time"].iloc[0]) == "2024-05-02 09:00:00+00:00"
    assert open_log(postgres_url, tmp_path).count() == 121  # another reader
    # where the log stands (the runner's cache asks it for the monitor): reading moves nothing, a label moves it
    position = log_position(postgres_url, tmp_path)
    assert log_position(postgres_url, tmp_path) == position and position["identity"].startswith("postgresql:")
    log.record_label("r4", 1)
    assert log.flush(timeout=30)
    assert log_position(postgres_url, tmp_path)["commit"] > position["commit"]
    log.close()
    assert log.errors == []


def test_postgres_connection_killed_mid_load(postgres_url, tmp_path):
    import psycopg

    log = open_log(postgres_url, tmp_path, batch_size=200)
    threads, chunks, chunk_size = 3, 100, 100
    workers = record_from_threads(log, threads, chunks, chunk_size, pause=0.01)
    killed = 0
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        for _ in range(3):
            deadline = time.monotonic() + 30
            while log.count() == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)
            killed += admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'lifecycle-predlog' AND datname = current_database() "
                "AND pid <> pg_backend_pid()"
            ).fetchone()[0]
    for worker in workers:
        worker.join()
    assert log.flush(timeout=60)
    assert killed >= 1
    assert log.count() == threads * chunks * chunk_size
    assert any("SQLSTATE 57P01" in line or "OperationalError" in line for line in log.errors), log.errors
    assert all("patient" not in line for line in log.errors)
    log.close()


def test_postgres_unreachable_says_where_without_the_password(tmp_path):
    with pytest.raises(LifecycleError) as error:
        open_log(f"postgresql://someone:s3cret-pw@127.0.0.1:{free_port()}/log", tmp_path)
    assert "cannot open the prediction log postgresql://someone:***@127.0.0.1" in str(error.value)
    assert "s3cret-pw" not in str(error.value)


def test_postgres_blocks_log_each_prediction_once(postgres_url, tmp_path):
    """record_many's blocks in PostgreSQL: read back with their features, and a block repeating logged predictions adds
    only the new ones."""
    log = open_log(postgres_url, tmp_path)
    frame = pd.DataFrame({"age": np.arange(5000, dtype=float), "sex": ["m", "f"] * 2500})
    ids = [f"batch-x-{n:06d}" for n in range(5000)]
    log.record_many(
        ids[:3000],
        np.linspace(0, 1, 3000),
        np.zeros(3000, int),
        frame.iloc[:3000],
        2,
        ids=[f"patient-{n}" for n in range(3000)],
    )
    assert log.flush(timeout=30)
    log.record_many(
        ids[2000:], np.linspace(0, 1, 3000), np.ones(3000, int), frame.iloc[2000:], 2
    )  # 1000 of them logged already
    assert log.flush(timeout=30)
    assert log.count() == log.count("batch") == 5000 and log.refused == 0
    logged = open_log(postgres_url, tmp_path).predictions()  # another reader
    assert logged["request_id"].tolist() == ids
    assert logged["age"].tolist() == frame["age"].tolist() and logged["sex"].tolist() == frame["sex"].tolist()
    assert logged["decision"].tolist() == [0] * 3000 + [1] * 2000
    assert (
        logged["id_hash"].iloc[2999] == pseudonymize("patient-2999", id_key(tmp_path))
        and logged["id_hash"].iloc[3000] is None
    )
    assert log.predictions(limit=3)["request_id"].tolist() == ids[-3:]
    # a shadow's blocks carry no features (the champion's predictions hold them); one repeated is logged once
    shadow_ids = ["shadow:" + value for value in ids[:100]]
    log.record_many(shadow_ids[:60], np.full(60, 0.25), np.zeros(60, int), None, 3, channel="shadow")
    log.record_many(shadow_ids[40:], np.full(60, 0.75), np.ones(60, int), None, 3, channel="shadow")
    assert log.flush(timeout=30)
    assert log.count("shadow") == 100 and log.count() == 5100
    shadow = open_log(postgres_url, tmp_path).predictions().set_index("request_id").loc[shadow_ids]
    assert shadow["score"].tolist() == [0.25] * 60 + [0.75] * 40 and shadow["age"].isna().all()
    log.close()


def test_postgres_event_times_and_a_log_made_before_them(postgres_url, tmp_path):
    """A PostgreSQL log without the event_time and logged columns gets them when opened; rows, blocks and labels keep
    their own times."""
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as admin:  # the tables as logs made them before event times
        admin.execute(
            "CREATE TABLE predictions (request_id TEXT PRIMARY KEY, time TIMESTAMPTZ NOT NULL, model_version BIGINT "
            "NOT NULL, "
            "channel TEXT NOT NULL, score DOUBLE PRECISION, decision INTEGER NOT NULL, id_hash TEXT, features JSONB "
            "NOT NULL)"
        )
        admin.execute(
            "CREATE TABLE labels (request_id TEXT PRIMARY KEY, label INTEGER NOT NULL, time TIMESTAMPTZ NOT NULL)"
        )
        admin.execute(
            "INSERT INTO predictions VALUES ('old', '2024-01-01T00:00:00Z', 1, 'online', 0.5, 1, NULL, '{\"age\": 50}')"
        )
        admin.execute("INSERT INTO labels VALUES ('old', 1, '2024-01-03T00:00:00Z')")
    log = open_log(postgres_url, tmp_path)
    log.record([{**predictions(1)[0], "event_time": "2023-12-25T10:00:00+01:00"}])
    log.record_many(
        ["b-1", "b-2"],
        [0.1, 0.9],
        [0, 1],
        pd.DataFrame({"age": [40.0, 60.0]}),
        1,
        event_times=["2023-11-01T00:00:00Z", None],
    )
    log.record_label("r0", 1, "2024-01-01T09:00:00Z")  # known on January 1st, written now
    assert log.flush(timeout=30)
    times = open_log(postgres_url, tmp_path).predictions().set_index("request_id")
    assert times.loc["old", "event_time"] == pd.Timestamp("2024-01-01T00:00:00Z")  # an old row: its write time
    assert times.loc["r0", "event_time"] == pd.Timestamp("2023-12-25T09:00:00Z")
    assert times.loc["b-1", "event_time"] == pd.Timestamp("2023-11-01T00:00:00Z")
    assert times.loc["b-2", "event_time"] == times.loc["b-2", "time"]
    labels, refused = log.committed_labels(upto=log.settled_commit())
    labels = labels.set_index("request_id")
    assert labels.loc["r0", "time"] == pd.Timestamp("2024-01-01T09:00:00Z") and refused == []
    assert labels.loc["old", "time"] == pd.Timestamp(
        "2024-01-03T00:00:00Z"
    )  # an old label (no commit number) is read from the start
    assert log.committed_labels(after=0, upto=log.settled_commit())[0]["request_id"].tolist() == [
        "r0"
    ]  # a monitor's cursor finds it
    assert set(log.committed(after=0, upto=log.settled_commit())[0]["request_id"]) == {
        "r0",
        "b-1",
        "b-2",
    }  # the old row is before the sequence
    log.close()


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
def test_label_events_keep_provenance_and_history(store, request, tmp_path):
    """Each label is an event with its source, arrival and credential; a relabel is kept, the latest trusted one wins,
    disagreeing ones are counted; what the limits count; a journal replayed twice adds nothing; a label of the older
    labels table reads as `legacy` (on both stores)."""
    url = request.getfixturevalue("postgres_url") if store == "postgres" else ""
    log = open_log(url, tmp_path)
    log.record(predictions(3))
    log.record_label("r0", 1, "2024-01-02T00:00:00Z", "feedback", "lab")
    log.record_label("r0", 0, "2024-01-03T00:00:00Z", "feedback", "ward")  # a relabel from an untrusted labeller
    log.record_label("r1", 1, "2024-01-02T00:00:00Z", "import", "diagnoses")
    assert log.flush(timeout=30)
    if store == "sqlite":
        with sqlite3.connect(tmp_path / "predictions.sqlite") as database:  # another tool, the table before provenance
            database.execute("INSERT INTO labels (request_id, label, time) VALUES ('r2', 1, '2024-01-04T00:00:00Z')")
    else:
        import psycopg

        with psycopg.connect(url, autocommit=True) as database:
            database.execute("INSERT INTO labels (request_id, label, time) VALUES ('r2', 1, '2024-01-04T00:00:00Z')")
    history = log.label_history()
    assert history[["request_id", "label", "source", "credential"]].values.tolist() == [
        ["r0", 1, "feedback", "lab"],
        ["r0", 0, "feedback", "ward"],
        ["r1", 1, "import", "diagnoses"],
        ["r2", 1, "legacy", ""],
    ]
    assert history["logged"].notna().all()
    trusted = log.labels(("lab", "import"))
    assert trusted[["request_id", "label"]].values.tolist() == [["r0", 1], ["r1", 1]]
    assert log.labels()[["request_id", "label"]].values.tolist() == [["r1", 1], ["r0", 0], ["r2", 1]]  # by time known
    assert log.disagreeing() == 1
    assert (log.labels_sent(credential="lab"), log.labels_sent(request_id="r0")) == (1, 2)
    assert log.labels_sent(credential="lab", since=pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=1)) == 0
    labels, refused = log.committed_labels(after=0, upto=log.settled_commit())
    assert labels["credential"].tolist()[:3] == ["lab", "ward", "diagnoses"] and refused == []
    with pytest.raises(LifecycleError, match="never a secret"):
        log.record_label("r1", 1, None, "feedback", "Bearer s3cret")
    log.close()
