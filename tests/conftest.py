"Shared fixtures: projects written into temporary folders, and the `lifecycle` command run as a user runs it."

import contextlib
import fcntl
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Four test workers share two cores: one thread each for OpenMP and BLAS, or their thread pools spin against each other.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")
# One BLAS kernel on every machine: OpenBLAS picks its kernels by CPU (SkylakeX on an AVX-512 EPYC, Haswell on most
# others), and a logistic regression's last bits differ between them, so the model bytes pinned in
# tests/binary_parity.json would hold on one kind of CPU only. Haswell's kernels run on every x86-64 CPU with AVX2.
# Set before anything loads numpy; the servers and commands the tests start inherit it.
if platform.machine() in ("x86_64", "AMD64") and " avx2" in Path("/proc/cpuinfo").read_text(errors="replace"):
    os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")
# The default project's labeller (settings.ini: [labels] labellers = lab: LIFECYCLE_LABELLER_LAB): servers the tests
# start inherit it; LABELLER is the header a test sends its labels to /feedback with.
os.environ.setdefault("LIFECYCLE_LABELLER_LAB", "test-labeller-lab-secret-0123")
LABELLER = {"Authorization": f"Bearer {os.environ['LIFECYCLE_LABELLER_LAB']}"}
HEART = REPO / "data" / "heart-disease-uci"
LIFECYCLE = Path(sys.executable).parent / "lifecycle"
QUICK = ("--stages", "collect,prepare", "-p", "prepare.profile=false")  # the data stages only, without the profile
COLUMNS = "age, sex, cp, trestbps, chol, fbs, restecg, thalach, exang, oldpeak, slope, ca, thal, num"
HEART_COLUMNS = COLUMNS.split(", ")  # the UCI files' columns, the target last
FEATURES = HEART_COLUMNS[:-1]  # the default project's 13 features


def run_lifecycle(*args, cwd=None, check=None):
    """Run the `lifecycle` command; return (exit code, parsed JSON when --json, stdout, stderr)."""
    done = subprocess.run([str(LIFECYCLE), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=900)
    parsed = None
    if "--json" in args and done.stdout.strip():
        parsed = json.loads(done.stdout)
    if check is not None:
        assert done.returncode == check, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.returncode, parsed, done.stdout, done.stderr


def free_port() -> int:
    "A TCP port on 127.0.0.1 that nothing listens on now."
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def local_redis(timeout: float = 10):
    "A private redis-server on 127.0.0.1 and a free port, in a temporary folder, without persistence; yields its URL."
    import redis

    with tempfile.TemporaryDirectory(prefix="lifecycle-test-redis-") as folder:
        port = free_port()
        server = subprocess.Popen(
            [
                shutil.which("redis-server"),
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                folder,
                "--protected-mode",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.exceptions.ConnectionError:
                    assert server.poll() is None and time.monotonic() < deadline, (
                        f"redis-server did not start on port {port}"
                    )
                    time.sleep(0.02)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def wait_for(check, seconds=180, what="the condition"):  # a bound for a hang, not a measure of speed
    "Wait until `check()` is true; fail after `seconds` (a test that hangs, never a slow machine's verdict)."
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def stages(run):
    "The run's stages by name."
    return {stage["name"]: stage for stage in run["stages"]}


def copy_default_project(folder):
    "The default project (settings.ini and the UCI data) copied into `folder`/heart; returns that folder."
    project = folder / "heart"
    project.mkdir()
    shutil.copy(REPO / "settings.ini", project / "settings.ini")
    shutil.copytree(HEART, project / "data" / "heart-disease-uci")
    return project


@pytest.fixture
def heart_project(tmp_path):
    "A copy of the default project (settings.ini and the UCI data) in a temporary folder."
    return copy_default_project(tmp_path)


@pytest.fixture(scope="session")
def champion_template(tmp_path_factory):
    """The default project after one whole run (without the profile): a champion in its registry. Built once a
    session: under xdist, the first worker to need it builds it holding a lock in the folder all workers share
    (pytest-xdist's pattern for session data); the others wait, then read it. No test changes it (tests copy it)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # set in each xdist worker
        shared = shared.parent  # the session's folder, holding each worker's own
    folder = shared / "champion-template"
    with open(shared / "champion-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a worker dies holding it
        if not (folder / "heart" / "first-run.json").exists():  # written last: a build that failed is started again
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            project = copy_default_project(folder)
            # the latency gates decide on CPU time, so a busy test machine cannot refuse the template
            _, run, _, _ = run_lifecycle(
                "run", "--settings", project / "settings.ini", "-p", "prepare.profile=false", "--json", check=0
            )
            (project / "first-run.json").write_text(json.dumps(run))
    return folder / "heart"


EXAMPLE_CHEAP = ("-p", "prepare.profile=false", "-p", "evaluate.bootstrap_resamples=100")  # an example's test run


def copy_example(name: str, folder: Path) -> Path:
    "An example project copied with the data its settings name, at the same relative paths; returns its folder."
    project = folder / "examples" / name
    project.mkdir(parents=True)
    shutil.copy(REPO / "examples" / name / "settings.ini", project / "settings.ini")
    if (REPO / "examples" / name / "data").exists():
        shutil.copytree(REPO / "examples" / name / "data", project / "data")
    else:  # heart-severity reads the default project's files, two folders up
        shutil.copytree(HEART, folder / "data" / "heart-disease-uci")
    return project


@pytest.fixture(scope="session")
def example_templates(tmp_path_factory):
    """The example projects (examples/<name>) after one whole run each, as a user runs them (the profile off, fewer
    bootstrap resamples): a function of the example's name, giving the folder that holds `examples/<name>` and the
    run's JSON in `first-run.json`. Each is built on first use, once a session, under a lock the xdist workers share
    (as `champion_template`); no test changes it (tests copy it)."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent

    def template(name: str) -> Path:
        folder = shared / f"example-{name}"
        with open(shared / f"example-{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (folder / "first-run.json").exists():  # written last: a build that failed is started again
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                project = copy_example(name, folder)
                _, run, _, _ = run_lifecycle(
                    "run", "--settings", project / "settings.ini", *EXAMPLE_CHEAP, "--json", check=0
                )
                (folder / "first-run.json").write_text(json.dumps(run))
        return folder

    return template


@pytest.fixture
def champion_project(champion_template, tmp_path):
    "A copy of the template project for one test: its stages cached, its registry holding a champion."
    project = tmp_path / "heart"
    shutil.copytree(champion_template, project, symlinks=True)
    return project


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]  # this machine has no network: Chromium must not try


@pytest.fixture(scope="session")
def browser():
    "Debian's chromium, driven by playwright (never `playwright install`: it downloads a browser)."
    if not CHROMIUM.exists():
        message = "chromium is not installed: install Debian's chromium package (apt-get install chromium)"
        if os.environ.get("LIFECYCLE_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{message}; LIFECYCLE_REQUIRE_SERVICES=1 requires it")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def descendants(pid: int) -> set[int]:
    "The processes started (directly or not) by `pid`, from /proc."
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(
                next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:"))
            )
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def small_champion(
    root: Path,  # an empty folder: the project
    recode: str = "",  # the `[prepare] recode` the model was trained with ("" for none)
) -> Path:  # the project's folder
    """A project whose registry holds one small champion (logistic regression on age, chol, sex; 200 generated rows),
    its settings reading `visits.csv`: the stream and hostile-input tests' project, made in a second."""
    import numpy as np  # deferred: only the tests that ask for a small project need them
    import pandas as pd

    from lifecycle.registry import Registry, register, set_alias
    from lifecycle.train import build_pipeline

    (root / "settings.ini").write_text("[data]\nsources = visits: visits.csv\ntarget = num\npositive = 1\n")
    meta = {
        "features": {"numeric": ["age", "chol"], "categorical": ["sex"]},
        "threshold": 0.5,
        "schema": {
            "columns": {
                "age": {"kind": "numeric", "min": 1.0, "max": 120.0},
                "chol": {"kind": "numeric", "min": 80.0, "max": 700.0},
                "sex": {"kind": "category", "type": "number", "categories": [0.0, 1.0]},
            }
        },
        "settings": {**({"prepare": {"recode": recode}} if recode else {}), "data": {"id": ""}},
    }
    rng = np.random.default_rng(1)
    x = pd.DataFrame(
        {
            "age": rng.uniform(20, 80, 200),
            "chol": rng.uniform(100, 400, 200),
            "sex": rng.integers(0, 2, 200).astype(float),
        }
    )
    y = (x["age"] + 30 * x["sex"] > 65).astype(int)
    registry = Registry(root)
    model = build_pipeline("logistic_regression", ["age", "chol"], ["sex"]).fit(x, y)
    set_alias(registry, "champion", register(registry, model, meta), "test")
    return root


# --- CPU time a test: wall-clock durations on a shared machine measure the neighbours too ---------------------------
def _cpu_seconds() -> float:
    "CPU seconds of this process and of the children it has waited for (servers and commands the tests ran)."
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    "Record each phase's CPU seconds in the item's user properties (they travel with its reports from xdist workers)."
    item.user_properties.append(("cpu_start", _cpu_seconds()))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    item.user_properties.append((f"cpu_{call.when}", _cpu_seconds()))
    yield


def pytest_terminal_summary(terminalreporter):
    "The tests that took the most CPU (setup, call and teardown; a session fixture counts where it was built)."
    spent = {}
    for report in [report for reports in terminalreporter.stats.values() for report in reports]:
        marks = dict(getattr(report, "user_properties", ()))
        if getattr(report, "when", "") == "teardown" and "cpu_start" in marks and "cpu_teardown" in marks:
            spent[report.nodeid] = marks["cpu_teardown"] - marks["cpu_start"]
    if spent:
        terminalreporter.write_sep("=", "most CPU seconds (this process and its waited children)")
        for nodeid, seconds in sorted(spent.items(), key=lambda pair: -pair[1])[:30]:
            terminalreporter.write_line(f"{seconds:8.1f}s {nodeid}")
        terminalreporter.write_line(f"{sum(spent.values()):8.1f}s in all {len(spent)} tests")
