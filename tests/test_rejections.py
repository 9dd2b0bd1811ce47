"""Records the contract refuses are counted in the prediction log by reason, never by value, and monitoring shows them
per window."""

import json
import os
import shutil
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone

import httpx
import pandas as pd
from conftest import COLUMNS, LIFECYCLE, free_port, run_lifecycle
from test_replay_monitor import set_monitor

SECRET_ID = "PATIENT-SECRET-4711"  # the identifier of every refused record: it must not reach the log
SECRET_VALUE = 98765.4321  # a cholesterol no model knows: refused, and never stored
SECRET_TEXT = "sixty-seven-SECRET"  # an age that is not a number
SECRET_FIELD = "Jane Doe SECRET"  # a field name a client made up


def _good_records(project, count):
    "Cleveland's first complete patients, as JSON records."
    frame = (
        pd.read_csv(
            project / "data" / "heart-disease-uci" / "processed.cleveland.data",
            header=None,
            names=[name.strip() for name in COLUMNS.split(",")],
            na_values="?",
        )
        .dropna()
        .head(count)
    )
    return [{name: value for name, value in row.items() if name != "num"} for row in frame.to_dict("records")]


def _start_server(project, port):
    output = open(project / "serve.log", "w")
    server = subprocess.Popen(
        [
            str(LIFECYCLE),
            "serve",
            "--settings",
            str(project / "settings.ini"),
            "--port",
            str(port),
            "--log",
            "served.sqlite",
        ],
        stdout=output,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        assert server.poll() is None and time.time() < deadline, (project / "serve.log").read_text()
        time.sleep(0.1)


def _stored_bytes(project) -> bytes:
    "Everything the log keeps on disk: the database, its WAL, and the journals."
    files = [path for path in project.glob("served.sqlite*")] + list((project / ".lifecycle" / "journal").rglob("*"))
    return b"".join(path.read_bytes() for path in files if path.is_file())


def test_a_real_server_counts_refused_records_by_reason_and_monitoring_shows_them(champion_project):
    project = champion_project
    set_monitor(
        project,
        log="served.sqlite",
        window="day",
        alerts="records_refused (warning): rejected_share > 0.1\nchol_refused (critical): rejected.out_of_range > 100",
    )
    shutil.rmtree(project / "monitoring", ignore_errors=True)
    good = _good_records(project, 40)
    today = datetime.now(timezone.utc).replace(hour=12, minute=0, second=0, microsecond=0)
    first, second = (today - timedelta(days=3)).isoformat(), (today - timedelta(days=2)).isoformat()
    port = free_port()
    server = _start_server(project, port)
    try:
        url = f"http://127.0.0.1:{port}/predict"

        def post(records, when):
            return httpx.post(url, json=records, headers={"X-Event-Time": when}, timeout=30)

        assert post(good[:30], first).status_code == 200
        out_of_range = [{**record, "chol": SECRET_VALUE, "id": SECRET_ID} for record in good[30:35]]
        assert post(out_of_range, first).status_code == 422  # 5 records: out_of_range on chol
        mixed = [{**good[35], "age": SECRET_TEXT, "id": SECRET_ID}, good[36], good[37]]
        assert post(mixed, first).status_code == 422  # 1 wrong_type on age; 2 refused with their request
        answer = post([{**good[38], SECRET_FIELD: 1, "id": SECRET_ID}], second)
        assert answer.status_code == 422  # 1 unknown field
        assert post(good[:4], second).status_code == 200
        metrics = httpx.get(
            f"http://127.0.0.1:{port}/metrics", timeout=30
        ).text  # Prometheus sees the same counts, never a value
        assert 'lifecycle_refused_records_total{field="chol",reason="out_of_range"} 5.0' in metrics
        assert 'lifecycle_refused_records_total{field="age",reason="wrong_type"} 1.0' in metrics
        assert 'lifecycle_refused_records_total{field="",reason="unknown_field"} 1.0' in metrics
        for secret in (SECRET_ID, repr(SECRET_VALUE), SECRET_TEXT, SECRET_FIELD):
            assert secret not in metrics, secret
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    code, result, _, stderr = run_lifecycle("monitor", "--settings", project / "settings.ini", "--json")
    assert code == 0, stderr
    latest = result["latest"]
    assert latest["values"]["predictions"] == 4 and latest["values"]["rejected"] == 1
    assert latest["values"]["rejected_share"] == 0.2 and latest["values"]["rejected.unknown_field"] == 1
    assert latest["rejections"] == [{"reason": "unknown_field", "field": "", "count": 1, "share": 0.2}]
    assert [alert["labels"]["alertname"] for alert in result["alerts"]["firing"]] == ["records_refused"]

    windows = pd.read_parquet(project / "monitoring" / "windows.parquet").set_index("window")
    day = windows.loc[windows["window_start"].str.startswith(first[:10])].iloc[0]
    assert (day["predictions"], day["rejected"]) == (30, 8)
    assert (day["rejected.out_of_range"], day["rejected.wrong_type"], day["rejected.with_request"]) == (5, 1, 2)
    assert abs(day["rejected_share"] - 8 / 38) < 1e-12 and day["rejected_channel.online"] == 8
    details = json.loads((project / "monitoring" / "details" / f"{day.name}.json").read_text())
    assert [(row["reason"], row["field"], row["count"]) for row in details["rejections"]] == [
        ("out_of_range", "chol", 5),
        ("with_request", "", 2),
        ("wrong_type", "age", 1),
    ]

    stored = _stored_bytes(
        project
    )  # nothing of a refused record reaches the log: not its values, not its id, not a made-up field
    for secret in (SECRET_ID, repr(SECRET_VALUE), "98765", SECRET_TEXT, SECRET_FIELD, "SECRET"):
        assert secret.encode() not in stored, secret
    assert b"out_of_range" in stored  # the bytes searched are the log's: its counts are there
