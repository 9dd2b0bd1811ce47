"`lifecycle serve` as a real uvicorn server: answers, bad input, hot swap under load, SIGTERM under load."

import json
import math
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
from conftest import FEATURES, LABELLER, LIFECYCLE, free_port, wait_for
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

MARKER = "zq7secret"  # a submitted value that must never come back in a response or a log line
MARKER_NUMBER = 987654.125


class Server:
    "A `lifecycle serve` process on a free port, its output in a file."

    def __init__(self, project: Path, *extra: str):
        self.project, self.port = project, free_port()
        self.output = project / f"serve-{self.port}.log"
        self.process = subprocess.Popen(
            [
                str(LIFECYCLE),
                "serve",
                "--settings",
                str(project / "settings.ini"),
                "--port",
                str(self.port),
                "--access-log",
                *extra,
            ],
            stdout=open(self.output, "w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.url = f"http://127.0.0.1:{self.port}"
        try:
            self._wait_ready()
        except BaseException:  # a server that never got ready is not left running for the rest of the session
            self.process.kill()
            self.process.wait()
            raise

    def _wait_ready(self):
        deadline = time.time() + 180  # a bound for a hang: four test workers on a busy machine start it slowly
        while True:
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, self.output.read_text()
            assert time.time() < deadline, "the server did not get ready in 180 s"
            time.sleep(0.1)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)


def records_of(project: Path, split: str = "test") -> tuple[list[dict], pd.DataFrame]:
    run = json.loads((project / "first-run.json").read_text())
    clean = pd.read_parquet(project / "runs" / run["run_id"] / "prepare" / "clean.parquet")
    rows = clean[clean["_split"] == split]
    features = FEATURES
    records = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in zip(features, row)}
        for row in rows[features].itertuples(index=False, name=None)
    ]
    return records, rows


def log_count(project: Path) -> int:
    from lifecycle.serving.predlog import open_log

    log = open_log("", project)
    try:
        return log.count()
    finally:
        log.close()


@pytest.fixture(scope="module")
def server(champion_template, tmp_path_factory):
    import shutil

    project = tmp_path_factory.mktemp("serve") / "heart"
    shutil.copytree(champion_template, project, symlinks=True)
    running = Server(project, "--max-body", "1000000")  # a byte limit set: the record cap is what it holds
    yield running
    running.stop()
    assert MARKER not in running.output.read_text() and str(MARKER_NUMBER) not in running.output.read_text()


def test_answers_are_the_models_offline_scores(server):
    from lifecycle.registry import Registry, load_model

    records, rows = records_of(server.project)
    answer = httpx.post(server.url + "/predict", json=records, timeout=30)
    assert answer.status_code == 200
    registry = Registry(server.project)
    model, meta = load_model(registry, "champion"), registry.meta(registry.resolve("champion"))
    expected = model.predict_proba(rows[meta["features"]["numeric"] + meta["features"]["categorical"]])[:, 1]
    predictions = answer.json()["predictions"]
    assert [p["score"] for p in predictions] == expected.tolist()  # identical, not close
    assert [p["decision"] for p in predictions] == (expected >= meta["threshold"]).astype(int).tolist()
    assert len({p["request_id"] for p in predictions}) == len(records)
    single = httpx.post(server.url + "/predict", json=records[0], timeout=10).json()["predictions"][0]
    assert single["score"] == expected[0] and single["model_version"] == meta["version"]
    about = httpx.get(server.url + "/model").json()
    assert about["version"] == meta["version"] and about["sha256"] == meta["sha256"] and about["fast_path"]
    docs = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]["Record"]
    assert docs["properties"]["thal"]["anyOf"][0]["enum"] == [3.0, 6.0, 7.0] and "age" in docs["required"]
    assert httpx.get(server.url + "/docs").status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert (
        'lifecycle_requests_total{endpoint="predict",status="200"}' in metrics and "lifecycle_model_version" in metrics
    )
    assert (
        httpx.post(
            server.url + "/feedback", json={"request_id": single["request_id"], "label": 1}, headers=LABELLER
        ).status_code
        == 202
    )


def _record_strategy():
    "Records built from the heart schema, then spoiled in every way a client can spoil them."
    numbers = {"age": (1, 120), "trestbps": (50, 260), "chol": (80, 700), "thalach": (50, 250), "oldpeak": (-5, 10)}
    codes = {
        "sex": [0, 1],
        "cp": [1, 2, 3, 4],
        "fbs": [0, 1],
        "restecg": [0, 1, 2],
        "exang": [0, 1],
        "slope": [1, 2, 3],
        "ca": [0, 1, 2, 3],
        "thal": [3, 6, 7],
    }
    good = st.fixed_dictionaries(
        {
            **{k: st.floats(lo, hi) | st.none() for k, (lo, hi) in numbers.items()},
            **{k: st.sampled_from(v) | st.none() for k, v in codes.items()},
        }
    )
    spoilers = st.one_of(
        st.just(MARKER),
        st.text(min_size=1).map(lambda t: MARKER + t),
        st.booleans(),
        st.just(MARKER_NUMBER),
        st.just(float("nan")),
        st.just(float("inf")),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.just("x"), st.just(MARKER), max_size=1),
        st.integers(-(10**6), 10**6),
    )

    @st.composite
    def spoiled(draw):
        record = dict(draw(good))
        for name in draw(st.lists(st.sampled_from(sorted(record)), max_size=4, unique=True)):
            action = draw(st.sampled_from(["drop", "spoil", "spoil"]))
            if action == "drop":
                record.pop(name)
            else:
                record[name] = draw(spoilers)
        if draw(st.booleans()):
            record["unexpected_field"] = MARKER
        return record

    return spoiled()


@hsettings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    payload=st.one_of(
        _record_strategy(), st.lists(_record_strategy(), max_size=4), st.just(MARKER), st.integers(), st.none()
    ),
    raw=st.sampled_from([None, b'{"age": 3', b"\xff\xfe" + MARKER.encode(), b"", b"[" * 50]),
)
def test_bad_input_never_gets_a_5xx_and_never_echoes_a_value(server, payload, raw):
    body = raw if raw is not None else json.dumps(payload, allow_nan=True).encode()
    answer = httpx.post(server.url + "/predict", content=body, headers={"content-type": "application/json"}, timeout=10)
    assert answer.status_code in (200, 422), answer.text
    assert MARKER not in answer.text and str(MARKER_NUMBER) not in answer.text
    if answer.status_code == 422:
        detail = answer.json()["detail"]
        assert detail and all(error["loc"][0] == "body" and error["msg"] and error["type"] for error in detail)
        for (
            error
        ) in detail:  # an error about a record names the record and, unless it is about the whole record, the field
            if len(error["loc"]) > 1 and error["type"] not in ("type_error.object", "too_many_missing"):
                assert isinstance(error["loc"][1], int) and isinstance(error["loc"][2], str)


def test_wrong_content_type_and_size(server):
    assert (
        httpx.post(server.url + "/predict", content=b"age=1", headers={"content-type": "text/plain"}).status_code == 415
    )
    assert (
        httpx.post(
            server.url + "/predict",
            content=b"[" + b"0," * 700_000 + b"0]",
            headers={"content-type": "application/json"},
        ).status_code
        == 413
    )
    assert httpx.get(server.url + "/health").status_code == 200  # still alive


def _hammer(url: str, records: list[dict], stop: threading.Event, outcome: dict):
    "Send single-record requests until told to stop; count answers by status and the predictions received."
    with httpx.Client(timeout=30) as client:
        i = 0
        while not stop.is_set():
            try:
                answer = client.post(url + "/predict", json=records[i % len(records)])
            except httpx.TransportError:
                outcome["transport_errors"] += 1
                if stop.is_set() or outcome.get("stopping"):
                    return
                continue
            outcome[answer.status_code] = outcome.get(answer.status_code, 0) + 1
            if answer.status_code == 200:
                outcome["predictions"] += len(answer.json()["predictions"])
                outcome["versions"].add(answer.json()["model_version"])
            i += 1


def test_hot_swap_under_load_fails_no_request(champion_project):
    from lifecycle.registry import Registry, load_model, register, set_alias

    server = Server(champion_project)
    records, _ = records_of(champion_project)
    registry = Registry(champion_project)
    first = registry.resolve("champion")
    stop, outcomes = threading.Event(), [{"transport_errors": 0, "predictions": 0, "versions": set()} for _ in range(8)]
    threads = [threading.Thread(target=_hammer, args=(server.url, records, stop, o)) for o in outcomes]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: sum(o["predictions"] for o in outcomes) >= 50, what="the first version's answers")
        meta = {k: v for k, v in registry.meta(first).items() if k not in ("version", "sha256", "bytes", "created")}
        second = register(registry, load_model(registry, first), meta)
        set_alias(registry, "champion", second, "hot swap test")
        deadline = time.monotonic() + 120  # a bound for a broken swap, not a measure of speed
        while httpx.get(server.url + "/model").json()["version"] != second:
            assert time.monotonic() < deadline, "the server did not swap in the new champion"
            time.sleep(0.1)
        wait_for(lambda: any(second in o["versions"] for o in outcomes), what="the second version's answers")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        server.stop()
    statuses = {k for o in outcomes for k in o if isinstance(k, int)}
    assert statuses == {200}, outcomes
    assert sum(o["transport_errors"] for o in outcomes) == 0
    assert {first, second} <= set().union(*(o["versions"] for o in outcomes))
    assert server.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its graceful shutdown


def test_a_champion_that_fails_to_load_leaves_the_old_one_serving_until_it_loads(champion_project):
    """A new champion whose file does not load: the old one answers on, the error is shown; the file mended, it loads,
    no alias moved."""
    from unittest import mock

    from lifecycle.registry import Registry, load_model, register, set_alias

    registry = Registry(champion_project)
    first = registry.resolve("champion")
    meta = {k: v for k, v in registry.meta(first).items() if k not in ("version", "sha256", "bytes", "created")}
    second = register(registry, load_model(registry, first), meta)
    records, _ = records_of(champion_project)
    server = Server(champion_project)
    try:
        path = registry.path / "versions" / str(second) / "model.skops"
        good = path.read_bytes()
        path.write_bytes(b"not a model")
        with mock.patch(
            "lifecycle.registry.load_model"
        ):  # set_alias would refuse the file; here it changed after the check
            set_alias(registry, "champion", second, "test: a champion that fails to load")
        deadline = time.time() + 60
        while "failed to load" not in (httpx.get(server.url + "/model").json()["load_error"] or ""):
            assert time.time() < deadline, "the server did not report the failed load"
            time.sleep(0.1)
        about = httpx.get(server.url + "/model").json()
        assert about["version"] == first and f"version {second} failed to load" in about["load_error"]
        assert f"still serving version {first}" in about["load_error"] and "again in" in about["load_error"]
        answer = httpx.post(server.url + "/predict", json=records[:3], timeout=30)
        assert answer.status_code == 200 and answer.json()["model_version"] == first
        path.write_bytes(good)  # mended: the next try loads it, with nobody moving the alias again
        deadline = time.time() + 120
        while (about := httpx.get(server.url + "/model").json())["version"] != second:
            assert time.time() < deadline, "the server did not try the mended file again"
            time.sleep(0.2)
        assert about["load_error"] is None and about["swaps"] == 1
    finally:
        server.stop()
    assert "Traceback" not in server.output.read_text()


def test_sigterm_under_load_writes_every_prediction_served(champion_project):
    before = log_count(champion_project)
    server = Server(champion_project)
    records, _ = records_of(champion_project)
    stop, outcomes = (
        threading.Event(),
        [{"transport_errors": 0, "predictions": 0, "versions": set(), "stopping": False} for _ in range(8)],
    )
    threads = [threading.Thread(target=_hammer, args=(server.url, records, stop, o)) for o in outcomes]
    for thread in threads:
        thread.start()
    # under load: the signal comes once the server has answered 200 predictions, however slow the machine is
    wait_for(lambda: sum(o["predictions"] for o in outcomes) >= 200, what="200 answers under load")
    for outcome in outcomes:
        outcome["stopping"] = True
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
    stop.set()
    for thread in threads:
        thread.join()
    served = sum(o["predictions"] for o in outcomes)
    assert served >= 200
    assert all(k in (200, "transport_errors", "predictions", "versions", "stopping") for o in outcomes for k in o), (
        outcomes
    )
    assert log_count(champion_project) - before == served
