"""Two `lifecycle serve` replicas, as on two machines: one PostgreSQL log, one registry folder. A promotion and a
rollback reach both; kill -9 of one under load (started again, as an orchestrator would) loses nothing answered;
request ids never collide; the monitor counts each prediction once."""

import os
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
from conftest import LIFECYCLE, free_port, run_lifecycle, wait_for
from test_predlog import postgres_server, postgres_url  # noqa: F401  (the real PostgreSQL fixtures)
from test_serve import records_of
from test_serve_workers import _second_version


class Replica:
    "`lifecycle serve` on a port of its own, for the project whose settings name the PostgreSQL log."

    def __init__(self, project: Path, port: int | None = None):
        self.project, self.port = project, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = project / f"replica-{self.port}.log"
        command = [str(LIFECYCLE), "serve", "--settings", str(project / "settings.ini"), "--port", str(self.port)]
        self.process = subprocess.Popen(
            command, stdout=open(self.output, "a"), stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )

    def ready(self) -> bool:
        try:
            return httpx.get(self.url + "/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


class Balanced:
    """Eight clients, as behind a load balancer: each request to the next replica in turn; every answer's request id,
    model version and replica kept. A replica that is down costs a transport error, not an answer."""

    def __init__(self, urls: list[str], records: list[dict]):
        self.urls, self.records = urls, records
        self.answers: list[tuple[str, int, int]] = []  # (request id, model version, replica)
        self.statuses: dict = {}
        self.out: set[int] = set()  # replicas out of rotation: not ready (an orchestrator's readiness probe)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(8)]

    def _client(self, offset: int):
        with httpx.Client(timeout=30) as client:
            n = offset
            while not self._stop.is_set():
                replica = n % len(self.urls)
                if replica in self.out:
                    n += 1
                    continue
                try:
                    answer = client.post(self.urls[replica] + "/predict", json=self.records[n % len(self.records)])
                except httpx.TransportError:  # the replica is down (killed, or starting again)
                    n += 1
                    self._stop.wait(0.05)
                    continue
                n += 1
                self.statuses[answer.status_code] = self.statuses.get(answer.status_code, 0) + 1
                if answer.status_code == 200:
                    body = answer.json()
                    self.answers += [(p["request_id"], body["model_version"], replica) for p in body["predictions"]]

    def start(self) -> "Balanced":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def versions_since(self, mark: int) -> dict[int, set[int]]:
        "Replica -> the versions it answered with after the `mark`-th answer."
        found: dict[int, set[int]] = {}
        for _, version, replica in self.answers[mark:]:
            found.setdefault(replica, set()).add(version)
        return found


def _both_on(load: Balanced, version: int):
    "A check: after a moment, both replicas answer with `version` only."
    mark = len(load.answers)
    return lambda: (
        len(load.answers) > mark + 50
        and load.versions_since(len(load.answers) - 40)
        == {
            0: {version},
            1: {version},
        }
    )


def test_two_replicas_on_one_postgresql_log_and_registry(champion_project, postgres_url):
    """Promote, roll back and kill -9 one of two replicas under load: both switch versions; nothing answered is lost
    or logged twice; no request id is issued twice; the monitor counts every prediction once."""
    from lifecycle.serving.predlog import open_log

    settings = champion_project / "settings.ini"
    settings.write_text(settings.read_text().replace("[monitor]\n", f"[monitor]\nlog = {postgres_url}\n", 1))
    first, second = _second_version(champion_project)
    replicas = [Replica(champion_project), Replica(champion_project)]
    load = Balanced([replica.url for replica in replicas], records_of(champion_project)[0])
    try:
        wait_for(lambda: all(replica.ready() for replica in replicas), what="both replicas ready")
        load.start()
        wait_for(_both_on(load, first), what="both replicas answering")
        promoted = run_lifecycle("models", "promote", second, "--force", "--reason", "test", "--settings", settings)
        assert promoted[0] == 0, promoted[3]
        wait_for(_both_on(load, second), what="both replicas serving the promoted version")
        rolled = run_lifecycle("models", "rollback", "--settings", settings)
        assert rolled[0] == 0, rolled[3]
        wait_for(_both_on(load, first), what="both replicas serving the version rolled back to")
        os.kill(replicas[1].process.pid, signal.SIGKILL)  # a machine lost; its orchestrator starts it again
        load.out.add(1)  # its readiness probe fails: out of rotation until /ready answers 200
        replicas[1].process.wait()
        replicas[1] = Replica(champion_project, replicas[1].port)
        wait_for(replicas[1].ready, what="the replica started again, ready")
        load.out.discard(1)
        wait_for(_both_on(load, first), what="the replica started again answering")
    finally:
        load.stop()
        codes = [replica.stop() for replica in replicas]
    served = [rid for rid, _, _ in load.answers]
    with open_log(postgres_url, champion_project) as log:
        logged = log.predictions().query("channel == 'online'")["request_id"]
    for replica, code in zip(replicas, codes):  # uvicorn drains, then ends by the signal it got (or 0)
        assert code in (0, -signal.SIGTERM), replica.output.read_text()[-2000:]
        assert replica.output.read_text().rstrip().endswith(f"Finished server process [{replica.process.pid}]")
    assert set(load.statuses) == {200}, load.statuses
    assert len(set(served)) == len(served), "two answers carried one request id"
    assert logged.is_unique
    missing = set(served) - set(logged)
    assert not missing, f"{len(missing)} of {len(served)} answered predictions are not in the log"
    code, summary, out, err = run_lifecycle("monitor", "--json", "--settings", settings)
    assert code in (0, 3), err
    assert summary["new_predictions"] == len(logged), (summary["new_predictions"], len(logged))
    again = run_lifecycle("monitor", "--json", "--settings", settings)[1]
    assert again["new_predictions"] == 0, again["new_predictions"]  # each prediction counted once, not again
    print(f"two replicas, promote, rollback, kill -9: {len(served)} served, {len(logged)} logged and monitored")


ROOT = Path(__file__).resolve().parents[1]


def _dockerfile() -> dict:
    "What the Dockerfile says: its WORKDIR, the port it exposes, the registry's place, its command."
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    workdir = next(line.split()[1] for line in lines if line.startswith("WORKDIR "))
    registry = next(line.split()[-1] for line in lines if line.startswith("COPY") and " registry " in line)
    return {
        "workdir": workdir,
        "port": int(next(line.split()[1] for line in lines if line.startswith("EXPOSE "))),
        "registry": str(Path(workdir) / registry),
        "command": next(line for line in lines if line.startswith("CMD ")),
    }


def test_the_kubernetes_example_runs_the_image_the_dockerfile_builds():
    """deploy/kubernetes.yaml parses, runs N replicas of the Dockerfile's image on its port, probes routes the server
    has, mounts the registry where the image keeps it, gives SIGTERM's drain its time, and sets only variables the
    image or the server reads."""
    import yaml

    from lifecycle.serving.predlog.rows import ID_KEY_ENV
    from lifecycle.serving.routes import ROUTERS

    documents = {doc["kind"]: doc for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text())}
    assert set(documents) == {"Secret", "PersistentVolumeClaim", "Deployment", "Service"}
    image = _dockerfile()
    deployment = documents["Deployment"]["spec"]
    assert deployment["replicas"] >= 2
    pod = deployment["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 30  # uvicorn's graceful shutdown (`serve`: 30 s), then the log
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": image["port"]}
    routes = {route.path for router in ROUTERS for route in router.routes}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes and container[probe]["httpGet"]["port"] == "http"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["registry"] == image["registry"]
    claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    assert claims["registry"] == documents["PersistentVolumeClaim"]["metadata"]["name"]
    assert "ReadWriteMany" in documents["PersistentVolumeClaim"]["spec"]["accessModes"]
    names = set(documents["Secret"]["stringData"]) | {variable["name"] for variable in container["env"]}
    serve_source = (ROOT / "lifecycle" / "serving" / "serve.py").read_text()
    labellers = (ROOT / "settings.ini").read_text()
    for name in names:
        assert (
            f"${{{name}" in image["command"] or f'"{name}"' in serve_source or name == ID_KEY_ENV or name in labellers
        ), f"{name}: neither the image's command nor the server reads it"
    assert container["envFrom"][0]["secretRef"]["name"] == documents["Secret"]["metadata"]["name"]
    service = documents["Service"]["spec"]
    assert service["selector"] == deployment["selector"]["matchLabels"] == deployment["template"]["metadata"]["labels"]
    assert service["ports"][0]["targetPort"] == "http"


def _container_runtime() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _container_runtime(), reason="no container runtime here (docker info fails): image not built")
def test_the_image_builds_and_answers_ready(champion_project, tmp_path):
    """Where a container runtime exists: the Dockerfile builds with the project's registry, and the container answers
    /ready with the champion, then stops on SIGTERM (docker stop) with exit code 0."""
    import shutil

    context = tmp_path / "image"
    context.mkdir()
    for name in ("Dockerfile", "pyproject.toml", "requirements.lock", "README.md", "settings.ini"):
        shutil.copy(ROOT / name, context / name)
    for folder in ("lifecycle", "nbs"):
        shutil.copytree(ROOT / folder, context / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(champion_project / "registry", context / "registry")
    tag = f"lifecycle-test-{os.getpid()}"
    subprocess.run(["docker", "build", "-t", tag, str(context)], check=True, timeout=1800)
    port = free_port()
    token = "a-test-token-0123456789"
    name = f"{tag}-run"
    subprocess.run(
        [
            "docker",
            "run",
            "-d",
            "--name",
            name,
            "-p",
            f"127.0.0.1:{port}:8000",
            "-e",
            f"LIFECYCLE_API_TOKEN={token}",
            "-e",
            "LIFECYCLE_WORKERS=2",
            tag,
        ],
        check=True,
        timeout=120,
    )
    try:
        wait_for(lambda: _answers_ready(f"http://127.0.0.1:{port}"), what="the container's /ready")
        stopped = subprocess.run(["docker", "stop", "-t", "40", name], timeout=120)
        assert stopped.returncode == 0
        state = subprocess.run(
            ["docker", "inspect", "-f", "{{.State.ExitCode}}", name], capture_output=True, text=True, timeout=60
        )
        assert state.stdout.strip() == "0", state.stdout
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)


def _answers_ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False
