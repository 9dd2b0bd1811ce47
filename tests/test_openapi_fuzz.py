"""The OpenAPI document and the server agree: schemathesis, a schema-driven fuzzer, runs every one of its checks
against a live `lifecycle serve` (the scoring token required, `/feedback` with a labeller's credential) and finds no
failure. Bounded: a fixed number of examples, derandomized, a fixed seed."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import LABELLER, LIFECYCLE, free_port

TOKEN = "fuzzing-token-for-the-openapi-test"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
EXAMPLES = "20"  # examples an operation, past the examples and coverage phases

# Every check runs. 413 is a refusal of invalid data (a body over the byte limit the request body states); valid data
# never gets one: the byte limit holds the documented number of records of the largest valid form
# (`serving.openapi.predict_limits`). One allowance is left, on /predict only: a 422 to valid-looking records, for
# two rules JSON Schema cannot state in a form the fuzzer generates from (nbs/35c_serve_openapi): the share of a
# record's features that are missing (`x-max-missing-features`) and the range of a number sent as text.
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

[checks.positive_data_acceptance]
expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]

[[operations]]
include-path = "/predict"
checks.positive_data_acceptance.expected-statuses = ["2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx"]
"""


@pytest.fixture(scope="module")
def live_server(champion_template, tmp_path_factory):
    "The champion served for real, with a scoring token; yields its URL."
    project = tmp_path_factory.mktemp("fuzz") / "heart"
    shutil.copytree(champion_template, project, symlinks=True)
    port, output = free_port(), project / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LIFECYCLE_API_TOKEN": TOKEN}
    process = subprocess.Popen(
        [str(LIFECYCLE), "serve", "--settings", str(project / "settings.ini"), "--port", str(port)],
        stdout=open(output, "w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120  # a bound for a hang, not a measure of speed
    while True:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.time() < deadline, output.read_text()
        time.sleep(0.2)
    yield url
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert "Traceback" not in output.read_text()


def _fuzz(url: str, folder: Path) -> tuple[subprocess.CompletedProcess, Counter]:
    """One schemathesis run, every check, on every operation (the scoring token on all but /feedback, which gets a
    labeller's credential); returns the run and how often each (method, path, status) was seen."""
    labeller = LABELLER["Authorization"]
    (folder / "schemathesis.toml").write_text(
        f'headers = {{ Authorization = "Bearer {TOKEN}" }}\n{CONFIG}\n'
        f'[[operations]]\ninclude-path = "/feedback"\nheaders = {{ Authorization = "{labeller}" }}\n'
    )
    run = subprocess.run(
        [
            str(SCHEMATHESIS),
            "--config-file",
            str(folder / "schemathesis.toml"),
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--mode",
            "all",
            "--max-examples",
            EXAMPLES,
            "--seed",
            "27",
            "--generation-deterministic",
            "--workers",
            "1",
            "--no-color",
            "--report",
            "har",
            "--report-har-path",
            str(folder / "run.har"),
        ],
        capture_output=True,
        text=True,
        cwd=folder,  # its own files (.schemathesis) stay in the test's folder
        timeout=600,  # a bound for a hang, not a measure of speed
    )
    entries = json.loads((folder / "run.har").read_text())["log"]["entries"] if (folder / "run.har").exists() else []
    seen = Counter(
        (entry["request"]["method"], urlsplit(entry["request"]["url"]).path, entry["response"]["status"])
        for entry in entries
    )
    return run, seen


def test_the_fuzzer_finds_no_disagreement_between_the_document_and_the_server(live_server, tmp_path):
    run, seen = _fuzz(live_server, tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "Tested: 6" in run.stdout  # every operation of the document
    assert seen[("POST", "/predict", 200)] and seen[("POST", "/predict", 422)]  # scored, and refused
    assert seen[("GET", "/model", 200)] and seen[("GET", "/model", 401)]  # the token was sent, and left out
    # the labeller's credential reached /feedback: labels recorded (request ids from answered predictions) or unknown
    assert seen[("POST", "/feedback", 202)] + seen[("POST", "/feedback", 404)]
