"""`lifecycle serve --workers 2` as a user starts it: both workers answer, every answer is logged once, both switch to
a new champion and shadow, kill -9 of one loses nothing answered, SIGTERM drains both, /metrics sums both."""

import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx
from conftest import LIFECYCLE, descendants, free_port, wait_for
from test_predlog import postgres_server, postgres_url  # noqa: F401  (the real PostgreSQL fixtures)
from test_serve import records_of


def lane(request_id: str, lanes: int = 2) -> int:
    "The worker that issued a request id: its time part modulo the workers (`set_id_lane`)."
    return int(request_id.removeprefix("shadow:")[:16], 16) % lanes


class Workers:
    "`lifecycle serve --workers 2` on a free port, its output in a file."

    def __init__(self, project: Path, *extra: str):
        self.port = free_port()
        self.output = project / f"serve-{self.port}.log"
        command = [str(LIFECYCLE), "serve", "--settings", str(project / "settings.ini"), "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, "--workers", "2", *extra],
            stdout=open(self.output, "w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def workers(self) -> set[int]:
        return descendants(self.process.pid)

    def stop(self) -> int:
        "SIGTERM, as a service manager sends it; the supervisor's exit code once every worker drained."
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


class Load:
    """Eight clients sending one record a request, each on a new connection (so the kernel hands requests to both
    workers); every answer's request ids and model version kept."""

    def __init__(self, url: str, records: list[dict]):
        self.url, self.records = url, records
        self.answers: list[tuple[str, int]] = []  # (request id, model version), in the order answered
        self.statuses: dict = {}
        self.transport_errors = 0
        self._stop = threading.Event()
        self._threads = []

    def _client(self, offset: int):
        limits = httpx.Limits(max_keepalive_connections=0)
        # a bound for a hang, not a speed: a request timed out is served (and counted) yet not seen answered here
        with httpx.Client(timeout=120, limits=limits) as client:
            n = offset
            while not self._stop.is_set():
                try:
                    answer = client.post(self.url + "/predict", json=self.records[n % len(self.records)])
                except httpx.TransportError:  # the server is not up yet, or the worker holding it was killed
                    self.transport_errors += 1
                    self._stop.wait(0.05)
                    continue
                n += 1
                self.statuses[answer.status_code] = self.statuses.get(answer.status_code, 0) + 1
                if answer.status_code == 200:
                    body = answer.json()
                    self.answers += [(p["request_id"], body["model_version"]) for p in body["predictions"]]

    def start(self) -> "Load":
        self._stop.clear()
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(8)]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def lanes_since(self, mark: int, version: int | None = None) -> set[int]:
        "The workers that answered after the `mark`-th answer (with `version`, when given)."
        return {lane(rid) for rid, v in self.answers[mark:] if version is None or v == version}


def _writer_pid(server: Workers) -> int:
    "The process of the log's writer, as the supervisor's log names it (the latest one started)."
    lines = [
        line for line in server.output.read_text().splitlines() if "the prediction log's writer is process" in line
    ]
    return int(lines[-1].rsplit(" ", 1)[-1]) if lines else 0


def _second_version(project: Path) -> tuple[int, int]:
    "(the champion, a second version registered from the same model file)."
    from lifecycle.registry import Registry, load_model, register

    registry = Registry(project)
    first = registry.resolve("champion")
    meta = {k: v for k, v in registry.meta(first).items() if k not in ("version", "sha256", "bytes", "created")}
    return first, register(registry, load_model(registry, first), meta)


def test_two_workers_switch_together_and_a_killed_one_loses_nothing(champion_project):
    """Both workers answer; a new champion and a shadow: both switch; kill -9 of one worker under load: it is started
    again, and every prediction a client got is in the log once; SIGTERM ends the server."""
    from lifecycle.registry import Registry, set_alias
    from lifecycle.serving.predlog import open_log

    first, second = _second_version(champion_project)
    server = Workers(champion_project)
    load = Load(server.url, records_of(champion_project)[0]).start()
    try:
        wait_for(lambda: load.lanes_since(0) == {0, 1}, what="answers from both workers")
        set_alias(Registry(champion_project), "champion", second, "test: a new champion under two workers")
        wait_for(lambda: load.lanes_since(0, second) == {0, 1}, what="both workers answering with the new champion")
        set_alias(Registry(champion_project), "shadow", first, "test: a shadow under two workers")
        with open_log("", champion_project) as log:  # the shadow's rows carry the champion's ids: both lanes

            def shadow_lanes():
                frame = log.predictions()
                return {lane(rid) for rid in frame.loc[frame["channel"] == "shadow", "request_id"]}

            wait_for(lambda: shadow_lanes() == {0, 1}, what="both workers logging the shadow's predictions")
        before = server.workers()
        mark = len(load.answers)
        killed = min(before - {_writer_pid(server)})  # a worker, not the SQLite log's writer
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: len(server.workers() - before) == 1, what="a new worker in place of the killed one")
        wait_for(lambda: load.lanes_since(mark) == {0, 1}, what="answers from both workers after the kill")
    finally:
        load.stop()
        code = server.stop()
    served = [rid for rid, _ in load.answers]
    with open_log("", champion_project) as log:
        logged = log.predictions()
    online = logged.loc[logged["channel"] == "online", "request_id"]
    assert code == 0, server.output.read_text()[-3000:]
    assert set(load.statuses) == {200}, load.statuses
    assert len(set(served)) == len(served), "two answers carried one request id"
    assert online.is_unique
    missing = set(served) - set(online)
    assert not missing, f"{len(missing)} of {len(served)} answered predictions are not in the log"
    assert f"(process {killed}) was killed by signal 9; started again" in server.output.read_text()
    print(f"two workers, kill -9 of one: {len(served)} served, all logged; {len(online)} online rows in the log")


def _predictions_total(url: str) -> float:
    "The predictions /metrics counts, asked on a new connection (any worker may answer)."
    exposition = httpx.get(url + "/metrics", timeout=30).text
    lines = [line for line in exposition.splitlines() if line.startswith("lifecycle_predictions_total")]
    return sum(float(line.split()[-1]) for line in lines)


def test_two_workers_on_postgresql_sum_their_metrics_and_drain_on_sigterm(champion_project, postgres_url):
    """On PostgreSQL: /metrics from either worker counts both workers' predictions; SIGTERM under load: each worker
    answers what it holds and writes it; the log holds exactly the predictions served, each once."""
    from lifecycle.serving.predlog import open_log

    server = Workers(champion_project, "--log", postgres_url)
    load = Load(server.url, records_of(champion_project)[0]).start()
    try:
        wait_for(lambda: load.lanes_since(0) == {0, 1} and len(load.answers) >= 100, what="answers from both workers")
        load.stop()
        totals = {_predictions_total(server.url) for _ in range(6)}
        assert totals == {len(load.answers)}, (totals, len(load.answers))  # both workers' counts, from either
        mark = len(load.answers)
        load.start()
        wait_for(lambda: len(load.answers) >= mark + 100, what="answers under load")
    finally:
        code = server.stop()  # under load
        load.stop()
    served = [rid for rid, _ in load.answers]
    with open_log(postgres_url, champion_project) as log:
        logged = log.predictions()["request_id"]
    assert code == 0, server.output.read_text()[-3000:]
    assert set(load.statuses) == {200}, load.statuses
    assert len(set(served)) == len(served) and logged.is_unique
    assert set(logged) == set(served), (len(set(served) - set(logged)), len(set(logged) - set(served)))
    print(f"two workers on PostgreSQL, SIGTERM under load: {len(served)} served, {len(logged)} logged")


def test_one_writer_on_sqlite_survives_kill_and_label_limits_hold_across_workers(champion_project):
    """SQLite under two workers: one writer process writes the log. kill -9 of the writer under load: it is started
    again and nothing answered is lost or logged twice. Ten labels for one prediction sent at once to both workers:
    exactly the limit (3) is accepted, the rest get 429, and the log holds exactly 3."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import LABELLER

    from lifecycle.serving.predlog import open_log

    server = Workers(champion_project)
    load = Load(server.url, records_of(champion_project)[0]).start()
    try:
        wait_for(lambda: load.lanes_since(0) == {0, 1} and _writer_pid(server), what="both workers and the writer")
        writer = _writer_pid(server)
        assert writer in server.workers()
        mark = len(load.answers)
        os.kill(writer, signal.SIGKILL)
        wait_for(lambda: _writer_pid(server) not in (0, writer), what="a new writer in place of the killed one")
        wait_for(lambda: len(load.answers) >= mark + 200, what="answers after the writer's kill")
        target = load.answers[-1][0]

        def label(_):
            with httpx.Client(timeout=60) as client:  # a new connection each: either worker may take it
                return client.post(server.url + "/feedback", json={"request_id": target, "label": 1}, headers=LABELLER)

        wait_for(lambda: label(0).status_code != 404, what="the target prediction in the log")  # that is 1 label
        with ThreadPoolExecutor(10) as pool:
            codes = sorted(answer.status_code for answer in pool.map(label, range(10)))
    finally:
        load.stop()
        code = server.stop()
    served = [rid for rid, _ in load.answers]
    with open_log("", champion_project) as log:
        online = log.predictions().query("channel == 'online'")["request_id"]
        labels = log.labels_sent(request_id=target)
    assert code == 0, server.output.read_text()[-3000:]
    assert set(load.statuses) == {200}, load.statuses
    assert "the prediction log's writer was killed by signal 9; started again" in server.output.read_text()
    assert online.is_unique and len(set(served)) == len(served)
    missing = set(served) - set(online)
    assert not missing, f"{len(missing)} of {len(served)} answered predictions are not in the log"
    assert codes == [202, 202] + [429] * 8, codes  # the first label and two of these: the limit, 3
    assert labels == 3, labels
    print(f"one writer, kill -9 of it under load: {len(served)} served, all logged once; labels: {codes}")
