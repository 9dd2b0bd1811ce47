"""`lifecycle serve` attacked as a reliability review would: hostile requests beside normal clients, kill -9 under load,
the OpenAPI document checked against what the server answers, an address that would listen everywhere."""

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
from conftest import LABELLER, LIFECYCLE, free_port, wait_for
from test_serve import MARKER, Server, records_of

TOKEN = "t0ken-for-the-tests"  # 16 characters or more: a shorter token is refused at start


def _hostile_payloads(records: list[dict], seed: int, count: int) -> list[tuple[str, bytes]]:
    """(path, body) pairs a hostile client sends: huge numbers, deep nesting, surrogates and control characters in
    values and keys, many records, many errors, bad feedback. Seeded, so a failure replays."""
    rng = random.Random(seed)
    good = records[0]

    def record_text(record: dict, raw: dict | None = None) -> str:
        "A record as JSON text; `raw` maps keys (JSON string text) to values (JSON text) inserted as they are."
        raw = raw or {}
        base = json.dumps({k: v for k, v in record.items() if k not in raw})
        extra = ", ".join(f'"{key}": {value}' for key, value in raw.items())
        return base[:-1] + (", " if len(base) > 2 and extra else "") + extra + "}"

    makers = [
        lambda: ("/predict", record_text(good, {"age": "1" + "0" * 309})),  # 10**309: no float holds it
        lambda: ("/predict", record_text(good, {"chol": "-" + "9" * rng.randint(310, 6000)})),
        lambda: ("/predict", record_text(good, {"age": "1e400"})),
        lambda: ("/predict", "[" * 1000 + "]" * 1000),
        lambda: ("/predict", '{"a":' * 1000 + "1" + "}" * 1000),
        lambda: ("/predict", record_text(good, {"age": "[" * 900 + "]" * 900})),
        lambda: ("/predict", record_text(good, {"id": '"\\ud800"'})),
        lambda: ("/predict", record_text(good, {"id": '"a\\u0000b"'})),
        lambda: ("/predict", record_text(good, {"id": "1" + "0" * 5000})),
        lambda: ("/predict", record_text(good, {"sex": '"\\udfff' + MARKER + '"'})),
        lambda: ("/predict", record_text(good, {"thal": '"\\u0000\\u001b[31m"'})),
        lambda: (
            "/predict",
            record_text(good, {"\\ud800key": "1"}),
        ),  # an unknown key: named in the 422 (a name, not a value), escaped
        lambda: ("/predict", record_text(good, {"\\u0000": "1"})),
        lambda: ("/predict", json.dumps([good] * rng.randint(500, 3000))),  # many records
        lambda: ("/predict", json.dumps([{}] * rng.randint(100, 2000))),  # many errors
        lambda: ("/predict", json.dumps([good] * 20 + [{**good, "age": MARKER}] * 20)),
        lambda: (
            "/predict",
            "[" + ",".join([record_text(good)] * 5 + [record_text(good, {"age": "1" + "0" * 400})]) + "]",
        ),
        lambda: ("/feedback", '{"request_id": "\\u0000", "label": 1}'),
        lambda: ("/feedback", '{"request_id": "\\ud800", "label": 1}'),
        lambda: ("/feedback", json.dumps({"request_id": "a" * 900_000, "label": 1})),
        lambda: ("/feedback", json.dumps({"request_id": "%032x" % rng.getrandbits(128), "label": 1})),
        lambda: ("/feedback", '{"request_id": "' + "0" * 32 + '", "label": 1, "\\ud800": 2}'),
        lambda: ("/feedback", "[" * 1000 + "]" * 1000),
    ]
    chosen = [makers[n % len(makers)] for n in range(len(makers))] + [
        rng.choice(makers) for _ in range(count - len(makers))
    ]
    return [(path, body.encode("utf-8", "surrogatepass")) for path, body in (make() for make in chosen)]


def _normal_client(url: str, records: list[dict], stop: threading.Event, outcome: dict):
    with httpx.Client(timeout=60) as client:
        n = 0
        while not stop.is_set():
            try:
                answer = client.post(url + "/predict", json=records[n % len(records)])
            except httpx.TransportError:
                outcome["transport_errors"] += 1
                continue
            outcome[answer.status_code] = outcome.get(answer.status_code, 0) + 1
            n += 1


def _hostile_client(url: str, payloads: list, outcome: dict):
    with httpx.Client(timeout=120) as client:
        for path, body in payloads:
            try:
                # with a labeller's credential: a hostile labeller's bodies reach the checks behind it
                answer = client.post(url + path, content=body, headers={"content-type": "application/json", **LABELLER})
            except httpx.TransportError:
                outcome["transport_errors"] += 1
                continue
            outcome[answer.status_code] = outcome.get(answer.status_code, 0) + 1
            if answer.status_code >= 500:
                outcome["5xx"].append(body[:80])
            if MARKER in answer.text:
                outcome["echoed"] += 1


@pytest.fixture(scope="module")
def hard_server(champion_template, tmp_path_factory):
    import shutil

    project = tmp_path_factory.mktemp("serve-hard") / "heart"
    shutil.copytree(champion_template, project, symlinks=True)
    running = Server(project)
    yield running
    running.stop()
    output = running.output.read_text()
    assert MARKER not in output and "Traceback" not in output, output[-3000:]


def test_hostile_clients_beside_normal_ones(hard_server):
    "Two hostile clients and four normal ones at once: no 5xx, no reset, and every normal request answered 200."
    records, _ = records_of(hard_server.project)
    stop = threading.Event()
    normal = [{"transport_errors": 0} for _ in range(4)]
    hostile = [{"transport_errors": 0, "5xx": [], "echoed": 0} for _ in range(2)]
    normals = [threading.Thread(target=_normal_client, args=(hard_server.url, records, stop, o)) for o in normal]
    hostiles = [
        threading.Thread(target=_hostile_client, args=(hard_server.url, _hostile_payloads(records, seed, 60), o))
        for seed, o in enumerate(hostile)
    ]
    for thread in normals + hostiles:
        thread.start()
    for thread in hostiles:
        thread.join()
    stop.set()
    for thread in normals:
        thread.join()
    hostile_answers = sum(v for o in hostile for k, v in o.items() if isinstance(k, int))
    print(
        f"fuzz: {hostile_answers} hostile requests, {sum(len(o['5xx']) for o in hostile)} 5xx, "
        f"{sum(o['transport_errors'] for o in hostile + normal)} resets; normal: {normal}"
    )
    assert hostile_answers == 120 and all(not o["5xx"] and o["transport_errors"] == 0 for o in hostile), hostile
    assert sum(o["echoed"] for o in hostile) == 0
    assert all(set(o) == {"transport_errors", 200} and o["transport_errors"] == 0 for o in normal), normal
    assert httpx.get(hard_server.url + "/health").status_code == 200


def test_many_to_one_batch_with_one_bad_request(hard_server):
    """Requests that arrive together share one model call; one holding a number no float can hold fails alone.
    Many rounds of eight simultaneous requests, one of them hostile: every good one is answered 200."""
    records, _ = records_of(hard_server.project)
    bad = json.dumps(records[0])[:-1] + ', "trestbps": ' + "1" + "0" * 309 + "}"
    barrier, statuses, lock = threading.Barrier(8), [], threading.Lock()

    def client(n):
        with httpx.Client(timeout=60) as session:
            for round_ in range(25):
                barrier.wait()
                body = bad.encode() if n == 0 else json.dumps(records[(n + round_) % len(records)]).encode()
                try:
                    status = session.post(
                        hard_server.url + "/predict", content=body, headers={"content-type": "application/json"}
                    ).status_code
                except httpx.TransportError:
                    status = "reset"
                with lock:
                    statuses.append((n == 0, status))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {status for hostile, status in statuses if hostile} == {422}
    assert {status for hostile, status in statuses if not hostile} == {200}, [s for s in statuses if s[1] != 200][:10]


def _hammer_ids(url: str, records: list[dict], stop: threading.Event, served: list, outcome: dict):
    "Send single records until stopped or the server dies; keep the request id of every 200 answer."
    with httpx.Client(timeout=30) as client:
        n = 0
        while not stop.is_set():
            try:
                answer = client.post(url + "/predict", json=records[n % len(records)])
            except httpx.TransportError:
                outcome["transport_errors"] += 1
                time.sleep(0.01)
                continue
            n += 1
            if answer.status_code == 200:
                served.extend(p["request_id"] for p in answer.json()["predictions"])


@pytest.mark.parametrize("run", range(3))
def test_sigkill_under_load_loses_no_answered_prediction(champion_project, run):
    "kill -9 while eight clients send requests: every prediction a client got an answer for is in the log."
    from lifecycle.serving.predlog import open_log

    server = Server(champion_project)
    records, _ = records_of(champion_project)
    stop, served, outcome = threading.Event(), [], {"transport_errors": 0}
    threads = [
        threading.Thread(target=_hammer_ids, args=(server.url, records, stop, served, outcome)) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    # the kill comes once this many answers are out (more at each run), however slow the machine is
    wait_for(lambda: len(served) >= 50 * (run + 1), what="answers under load")
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=30)
    stop.set()
    for thread in threads:
        thread.join()
    with open_log("", champion_project) as log:  # reopened after the crash, as the restarted server would
        logged = set(log.predictions()["request_id"])
    missing = set(served) - logged
    print(
        f"kill -9 run {run}: {len(served)} served, {len(set(served) & logged)} of them logged, {len(missing)} missing"
    )
    assert len(served) >= 50 * (run + 1)
    assert not missing, f"{len(missing)} of {len(served)} answered predictions are not in the log"


def _launch(project: Path, *extra: str, token: str | None = None) -> tuple[subprocess.Popen, str, Path]:
    "A `lifecycle serve` process that may never get ready (no model): waits for /health only."
    port = free_port()
    output = project / f"serve-{port}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LIFECYCLE_API_TOKEN", None)
    if token:
        env["LIFECYCLE_API_TOKEN"] = token
    process = subprocess.Popen(
        [str(LIFECYCLE), "serve", "--settings", str(project / "settings.ini"), "--port", str(port), *extra],
        stdout=open(output, "w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url, output
        except httpx.TransportError:
            pass
        assert process.poll() is None, output.read_text()
        assert time.time() < deadline, "the server did not start in 60 s"
        time.sleep(0.1)


def _check_documented(document: dict, path: str, method: str, answer: httpx.Response):
    "The answer's status is documented for the endpoint, with the answer's content type, and the body fits the schema."
    responses = document["paths"][path][method]["responses"]
    status = str(answer.status_code)
    assert status in responses, f"{method.upper()} {path} answered {status}, documented: {sorted(responses)}"
    media = answer.headers["content-type"].split(";")[0].strip()
    assert media in responses[status]["content"], (
        f"{method.upper()} {path} {status}: {media} not in {list(responses[status]['content'])}"
    )
    schema = responses[status]["content"][media]["schema"]
    if media == "application/json":
        jsonschema.validate(answer.json(), {**schema, "components": document["components"]})


def test_openapi_documents_every_answer(champion_project):
    "Requests of every kind, with a token required; each answer's status, content type and body are as documented."
    records, _ = records_of(champion_project)
    auth = {"authorization": f"Bearer {TOKEN}"}
    process, url, _ = _launch(champion_project, "--max-body", "1000000", token=TOKEN)  # 1,400,001 bytes: a 413
    try:
        deadline = time.time() + 60
        while httpx.get(url + "/ready").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.1)
        assert httpx.get(url + "/openapi.json").status_code == 401 and httpx.get(url + "/docs").status_code == 401
        document = httpx.get(url + "/openapi.json", headers=auth).json()
        from lifecycle.serving.openapi import record_bytes

        cap = document["components"]["schemas"]["PredictRequest"]["anyOf"][1]["maxItems"]
        assert document["paths"]["/predict"]["post"]["requestBody"]["x-max-body-bytes"] == 1_000_000
        assert 1 + cap * (record_bytes(document["components"]["schemas"]["Record"]) + 1) <= 1_000_000 and cap > 100
        assert httpx.get(url + "/docs", headers=auth).status_code == 200
        good = json.dumps(records[0]).encode()
        served = httpx.post(
            url + "/predict", content=good, headers={**auth, "content-type": "application/json"}
        ).json()["predictions"][0]
        as_json = {**auth, "content-type": "application/json"}
        labels = {**LABELLER, "content-type": "application/json"}
        sent = [
            ("/predict", "post", dict(content=good, headers=as_json)),
            ("/predict", "post", dict(content=json.dumps(records[:5]).encode(), headers=as_json)),
            ("/predict", "post", dict(content=good, headers={"content-type": "application/json"})),  # no token
            ("/predict", "post", dict(content=good, headers={**auth, "content-type": "text/plain"})),
            ("/predict", "post", dict(content=b"[" + b"0," * 700_000 + b"0]", headers=as_json)),
            ("/predict", "post", dict(content=b'{"age": ', headers=as_json)),
            ("/predict", "post", dict(content=b"[" * 1000 + b"]" * 1000, headers=as_json)),
            ("/predict", "post", dict(content=json.dumps({**records[0], "age": "old"}).encode(), headers=as_json)),
            ("/predict", "post", dict(content=b"[]", headers=as_json)),
            (
                "/feedback",
                "post",
                dict(content=json.dumps({"request_id": served["request_id"], "label": 1}).encode(), headers=labels),
            ),
            (
                "/feedback",
                "post",
                dict(content=json.dumps({"request_id": "f" * 32, "label": 0}).encode(), headers=labels),
            ),
            ("/feedback", "post", dict(content=json.dumps({"request_id": "", "label": 0}).encode(), headers=labels)),
            (  # the scoring token is not a labeller's credential
                "/feedback",
                "post",
                dict(content=json.dumps({"request_id": served["request_id"], "label": 0}).encode(), headers=as_json),
            ),
            (
                "/feedback",
                "post",
                dict(
                    content=json.dumps({"request_id": served["request_id"], "label": 1}).encode(),
                    headers={"content-type": "application/json"},
                ),
            ),
            ("/feedback", "post", dict(content=b"x", headers={**LABELLER, "content-type": "text/csv"})),
            ("/feedback", "post", dict(content=b'{"request_id": "' + b"a" * 1_100_000 + b'"}', headers=labels)),
            ("/health", "get", dict()),
            ("/ready", "get", dict()),
            ("/model", "get", dict(headers=auth)),
            ("/model", "get", dict()),
            ("/metrics", "get", dict(headers=auth)),
            ("/metrics", "get", dict()),
        ]
        seen = set()
        for path, method, request in sent:
            answer = httpx.request(method.upper(), url + path, timeout=30, **request)
            _check_documented(document, path, method, answer)
            seen.add((path, answer.status_code))
        assert {("/predict", s) for s in (200, 401, 413, 415, 422)} <= seen and {
            ("/feedback", s) for s in (202, 401, 404, 413, 415, 422)
        } <= seen
        # the request schemas say what the server accepts: an empty request_id is refused by both
        feedback_schema = {"$ref": "#/components/schemas/Feedback", "components": document["components"]}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"request_id": "", "label": 1}, feedback_schema)
        jsonschema.validate({"request_id": served["request_id"], "label": 1}, feedback_schema)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    # and before a model is loaded: 503s, as documented
    process, url, _ = _launch(champion_project, "--model", "99")
    try:
        document = httpx.get(url + "/openapi.json").json()
        for path, method, request in [
            ("/predict", "post", dict(content=good, headers={"content-type": "application/json"})),
            ("/model", "get", dict()),
            ("/ready", "get", dict()),
        ]:
            answer = httpx.request(method.upper(), url + path, timeout=30, **request)
            assert answer.status_code == 503
            _check_documented(document, path, method, answer)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def test_an_empty_host_needs_a_token(champion_project):
    "--host '' listens on every interface: like 0.0.0.0, it is refused without a token."
    env = {k: v for k, v in os.environ.items() if k != "LIFECYCLE_API_TOKEN"}
    done = subprocess.run(
        [
            str(LIFECYCLE),
            "serve",
            "--settings",
            str(champion_project / "settings.ini"),
            "--host",
            "",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode != 0 and "needs a token" in done.stderr and len(done.stderr.strip().splitlines()) == 1, (
        done.stderr
    )
