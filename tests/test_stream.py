"`lifecycle stream`: JSON lines on stdin and from a followed file, and Redis Streams against a real redis-server."

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from conftest import small_champion, wait_for

REQUIRE_SERVICES = os.environ.get("LIFECYCLE_REQUIRE_SERVICES") == "1"
COMMAND = [
    sys.executable,
    "-c",
    "import sys; from lifecycle.cli import main; sys.exit(main(['stream', *sys.argv[1:]]))",
]
GOOD = {"age": 61, "chol": 250, "sex": 1}


@pytest.fixture(scope="session")
def project(tmp_path_factory):
    "A project folder whose registry holds one small champion (age, chol, sex)."
    return small_champion(tmp_path_factory.mktemp("stream-project"), recode="sex: m -> 1, f -> 0")


@pytest.fixture(scope="session")
def redis_url():
    "A private redis-server (temporary folder, free port, no persistence), stopped at the end of the session."
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed: apt-get install redis-server (Debian's package)"
        if REQUIRE_SERVICES:
            pytest.fail(f"{message}; LIFECYCLE_REQUIRE_SERVICES=1 requires it")
        pytest.skip(message)
    from conftest import local_redis

    with local_redis() as url:
        yield url


@pytest.fixture
def client(redis_url):
    import redis

    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


def stream_args(project, tmp_path, *args):
    return [
        *COMMAND,
        "--settings",
        str(project / "settings.ini"),
        "--log",
        str(tmp_path / "predictions.sqlite"),
        *map(str, args),
    ]


def logged(project, tmp_path) -> int:
    from lifecycle.serving.predlog import open_log

    with open_log(str(tmp_path / "predictions.sqlite"), project) as prediction_log:
        return prediction_log.count("stream")


def outputs_of(client, stream) -> list[dict]:
    return [json.loads(fields[b"result"]) for _, fields in client.xrange(stream)]


def add_events(client, stream, records) -> list[str]:
    "XADD each record's JSON text (or raw text) in the field `record`; the entry ids."
    pipe = client.pipeline(transaction=False)
    for record in records:
        pipe.xadd(stream, {"record": record if isinstance(record, str) else json.dumps(record)})
    return [entry_id.decode() for entry_id in pipe.execute()]


# --- JSON lines -------------------------------------------------------------------------------------------------


def test_stdin_to_stdout(project, tmp_path):
    lines = [
        json.dumps(GOOD),
        '{"age": 6',
        "",
        json.dumps({"age": 300, "chol": 250, "sex": 1}),
        json.dumps({"event_id": "visit-5", "record": {"age": 40, "chol": 180, "sex": "f"}}),
    ]
    done = subprocess.run(
        stream_args(project, tmp_path, "--source", "-", "--sink", "-", "--json"),
        input="\n".join(lines),
        capture_output=True,
        text=True,
        timeout=300,  # a bound for a hang: four test workers on a busy machine start slowly
    )
    assert done.returncode == 0, done.stderr
    outputs = [json.loads(line) for line in done.stdout.splitlines()]
    assert [o["event_id"] for o in outputs] == [
        1,
        2,
        4,
        "visit-5",
    ]  # line numbers, blank lines counted; the producer's id
    assert outputs[1]["errors"][0]["type"] == "json_invalid"
    assert outputs[2]["errors"] == [
        {"loc": ["record", "age"], "msg": "outside the range 1 to 120", "type": "value_error.range"}
    ]
    # never a submitted value (paths left out: a temporary folder's name may hold any number, pytest-300)
    assert "300" not in re.sub(r"\S*/\S*", "<path>", json.dumps(outputs[2]) + done.stderr)
    assert {o["decision"] for o in outputs[::3]} <= {0, 1} and all(
        re.fullmatch(r"[0-9a-f]{32}", o["request_id"]) for o in outputs[::3]
    )
    summary = json.loads(done.stderr.strip().splitlines()[-1])  # on stderr: stdout carries the predictions
    assert (summary["events_in"], summary["scored"], summary["rejected"], summary["ended"]) == (4, 2, 2, "end")
    assert logged(project, tmp_path) == 2


def test_event_ids_reach_the_log_only_as_keyed_hashes(project, tmp_path):
    "A producer's event id (a visit number, markup) is hashed under the project's key: never in the log in clear."
    import sqlite3

    from lifecycle.serving.predlog import id_key
    from lifecycle.serving.stream import stream_request_id

    names = ["<script>alert(1)</script>", "visit-4711-Mustermann"]
    lines = [json.dumps({"event_id": name, "record": GOOD}) for name in names] + [json.dumps(GOOD)]
    runs = [
        subprocess.run(
            stream_args(project, tmp_path, "--source", "-", "--sink", "-"),
            input="\n".join(lines),
            capture_output=True,
            text=True,
            timeout=300,  # a bound for a hang: four test workers on a busy machine start slowly
        )
        for _ in range(2)
    ]  # the same events twice: the same request ids, logged once
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr
    outputs = [json.loads(line) for line in runs[0].stdout.splitlines()]
    assert [o["event_id"] for o in outputs[:2]] == names  # the producer's own sink gets its ids back
    secret = id_key(project)
    assert [o["request_id"] for o in outputs[:2]] == [stream_request_id(f"id:{name}", 1, secret) for name in names]
    assert all(re.fullmatch(r"[0-9a-f]{32}", o["request_id"]) for o in outputs)  # the form /feedback takes
    assert runs[1].stdout.splitlines()[:2] == runs[0].stdout.splitlines()[:2]
    with sqlite3.connect(tmp_path / "predictions.sqlite") as database:
        stored = {row[0] for row in database.execute("SELECT request_id FROM predictions")}
    assert stored >= {o["request_id"] for o in outputs[:2]} and len(stored) == 4  # stdin lines: new ids each run
    everything = b"".join(path.read_bytes() for path in tmp_path.rglob("*") if path.is_file())
    assert b"script" not in everything and b"Mustermann" not in everything
    assert b"script" not in (runs[0].stderr + runs[1].stderr).encode()


def test_follow_a_growing_file(project, tmp_path):
    source, sink = tmp_path / "visits.jsonl", tmp_path / "scores.jsonl"
    source.write_text(json.dumps(GOOD) + "\n")
    consumer = subprocess.Popen(
        stream_args(project, tmp_path, "--source", source, "--sink", sink, "--follow", "--max-wait-ms", 20),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: sink.exists() and len(sink.read_text().splitlines()) == 1, what="the first line")
        with open(source, "a") as handle:
            for age in range(30, 40):
                handle.write(json.dumps({"age": age, "chol": 200, "sex": 0}) + "\n")
                handle.flush()
            handle.write('{"age": 41, "ch')  # a line still being written: it waits for its end
            handle.flush()
            time.sleep(0.3)
            assert len(sink.read_text().splitlines()) == 11
            handle.write('ol": 210, "sex": 1}\nnot json\n')
        wait_for(lambda: len(sink.read_text().splitlines()) == 13, what="the appended lines")
        consumer.send_signal(signal.SIGTERM)
        stdout, stderr = consumer.communicate(timeout=180)
    finally:
        consumer.kill()
    assert consumer.returncode == 0, stderr
    outputs = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [o["event_id"] for o in outputs] == list(range(1, 14))
    assert outputs[11]["score"] >= 0 and outputs[12]["errors"][0]["type"] == "json_invalid"
    assert stdout.startswith("stream: 13 events in, 12 scored, 1 rejected") and "ended: stop" in stdout
    assert logged(project, tmp_path) == 12


def test_bad_arguments_are_one_line(project, tmp_path):
    done = subprocess.run(
        stream_args(project, tmp_path, "--source", "kafka://broker/visits", "--sink", "-"),
        capture_output=True,
        text=True,
        timeout=300,  # a bound for a hang: four test workers on a busy machine start slowly
    )
    assert (done.returncode, done.stderr.strip()) == (
        1,
        "lifecycle: --source: kafka:// is not supported; give -, a file path, or redis://host:port/db?stream=NAME",
    )
    from conftest import free_port

    done = subprocess.run(
        stream_args(project, tmp_path, "--source", f"redis://:pw@127.0.0.1:{free_port()}/0?stream=x", "--sink", "-"),
        capture_output=True,
        text=True,
        timeout=300,  # a bound for a hang: four test workers on a busy machine start slowly
    )
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert "cannot reach Redis at redis://:***@127.0.0.1" in done.stderr and "pw" not in done.stderr


# --- Redis Streams ------------------------------------------------------------------------------------------


def test_redis_scores_every_entry_and_acks_bad_ones(project, tmp_path, client, redis_url):
    stream = f"visits-{uuid.uuid4().hex[:8]}"
    ids = add_events(
        client, stream, [GOOD, '{"age": 6', {"age": 999, "chol": "high", "sex": 1}, {"age": 45, "chol": 180, "sex": 0}]
    )
    ids.append(client.xadd(stream, {"something": "else"}).decode())  # no `record` field
    done = subprocess.run(
        stream_args(
            project,
            tmp_path,
            "--source",
            f"{redis_url}?stream={stream}&group=scoring&consumer=a",
            "--sink",
            f"{redis_url}?stream={stream}-out",
            "--until-idle",
            "--max-wait-ms",
            50,
            "--json",
        ),
        capture_output=True,
        text=True,
        timeout=300,  # a bound for a hang: four test workers on a busy machine start slowly
    )
    assert done.returncode == 0, done.stderr
    outputs = outputs_of(client, f"{stream}-out")
    assert [o["event_id"] for o in outputs] == ids
    assert [sorted(o) for o in outputs] == [
        ["decision", "event_id", "model_version", "request_id", "score"],
        ["errors", "event_id"],
        ["errors", "event_id"],
        ["decision", "event_id", "model_version", "request_id", "score"],
        ["errors", "event_id"],
    ]
    from lifecycle.serving.predlog import id_key
    from lifecycle.serving.stream import stream_request_id

    assert outputs[0]["request_id"] == stream_request_id(f"{stream}/{ids[0]}", 1, id_key(project))
    assert [e["type"] for e in outputs[2]["errors"]] == ["value_error.range", "type_error.number"]
    assert "999" not in json.dumps(outputs[2]["errors"]) and "high" not in json.dumps(
        outputs
    )  # never a submitted value
    assert client.xpending(stream, "scoring")["pending"] == 0  # bad events are acknowledged too
    assert json.loads(done.stdout)["ended"] == "idle"
    assert logged(project, tmp_path) == 2


def test_consumer_killed_mid_batch_loses_nothing(project, tmp_path, client, redis_url):
    stream = f"visits-{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(7)
    records = [
        {"age": float(age), "chol": float(chol), "sex": int(sex)}
        for age, chol, sex in zip(
            rng.uniform(20, 80, 20_000), rng.uniform(100, 400, 20_000), rng.integers(0, 2, 20_000)
        )
    ]
    for index in range(0, len(records), 97):
        records[index] = {**records[index], "age": 500}  # out of range: an error output
    ids = []
    for start in range(0, len(records), 5000):
        ids += add_events(client, stream, records[start : start + 5000])
    good = sum(1 for record in records if record["age"] != 500)
    source = f"{redis_url}?stream={stream}&group=scoring"
    sink = f"{redis_url}?stream={stream}-out"
    first = subprocess.Popen(
        stream_args(project, tmp_path, "--source", source + "&consumer=first", "--sink", sink, "--batch-size", 100),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: client.xlen(f"{stream}-out") >= 2000, what="the first consumer's outputs")
        for _ in range(
            200
        ):  # freeze it; kill it when a batch is read and not acknowledged, else let it run a little more
            first.send_signal(signal.SIGSTOP)
            if client.xpending(stream, "scoring")["pending"] > 0:
                break
            first.send_signal(signal.SIGCONT)
            time.sleep(0.003)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    pending = client.xpending(stream, "scoring")["pending"]
    assert pending > 0, "the kill did not land mid-batch"
    assert client.xlen(f"{stream}-out") < len(ids), "the first consumer finished before it was killed"
    second = subprocess.run(
        stream_args(
            project,
            tmp_path,
            "--source",
            source + "&consumer=second",
            "--sink",
            sink,
            "--batch-size",
            500,
            "--claim-idle-ms",
            200,
            "--max-wait-ms",
            50,
            "--until-idle",
            "--json",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["claimed"] >= pending  # the dead consumer's entries were claimed and scored
    outputs = outputs_of(client, f"{stream}-out")
    answered = {o["event_id"] for o in outputs}
    assert answered == set(ids)  # every input event has an output, under its entry id
    assert len(outputs) >= len(ids)  # duplicates are possible after a crash, with the same event id
    by_event = {}
    for output in outputs:
        by_event.setdefault(output["event_id"], []).append(output)
    assert all(
        len({json.dumps(o, sort_keys=True) for o in same}) == 1 for same in by_event.values()
    )  # a duplicate is the same output
    assert client.xpending(stream, "scoring")["pending"] == 0
    assert logged(project, tmp_path) == good  # exactly one prediction a good event


def test_sigterm_finishes_the_batch_and_exits_cleanly(project, tmp_path, client, redis_url):
    stream = f"visits-{uuid.uuid4().hex[:8]}"
    consumer = subprocess.Popen(
        stream_args(
            project,
            tmp_path,
            "--source",
            f"{redis_url}?stream={stream}&group=scoring&consumer=a",
            "--sink",
            f"{redis_url}?stream={stream}-out",
            "--max-wait-ms",
            50,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: client.exists(stream) and client.xinfo_groups(stream), what="the consumer group")
        ids = add_events(client, stream, [GOOD] * 300)
        wait_for(lambda: client.xlen(f"{stream}-out") > 0, what="a first output")
        consumer.send_signal(signal.SIGTERM)
        stdout, stderr = consumer.communicate(timeout=180)
    finally:
        consumer.kill()
    assert consumer.returncode == 0, stderr
    assert "ended: stop" in stdout and stderr == ""
    scored = int(stdout.split(" events in")[0].split()[-1].replace(",", ""))
    assert client.xlen(f"{stream}-out") == scored and client.xpending(stream, "scoring")["pending"] == 0
    assert logged(project, tmp_path) == scored
    assert 0 < scored <= len(ids)
