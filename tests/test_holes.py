"""The small holes of issue 21, each closed: a webhook receiver that trickles its answer, hostile replay, collect and
batch input, the paired tests at their extremes, and the clinic's refusals in its own name."""

import json
import socket
import threading
from datetime import datetime, timezone

import pytest
from conftest import small_champion

# --- the alert webhook: a total deadline ---------------------------------------------------------------------------


class Trickler:
    """A real HTTP receiver on 127.0.0.1 that reads the request, then answers a byte at a time, `pause` seconds apart:
    `answer` whole, then (with `endless`) header lines for as long as the client keeps the connection open."""

    def __init__(self, pause: float = 0.2, answer: bytes = b"HTTP/1.1 200 OK\r\n", endless: bool = True, tls=None):
        self.pause, self.answer, self.endless, self.tls = pause, answer, endless, tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://localhost:{self.listener.getsockname()[1]}/alerts"
        self.requests, self.hung_up = [], threading.Event()
        self.stopped = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.answer_one, args=(connection,), daemon=True).start()

    def answer_one(self, connection):
        if self.tls is not None:
            try:
                connection = self.tls.wrap_socket(connection, server_side=True)
            except OSError:  # the client refused our certificate
                return
        with connection:
            received = b""
            while b"\r\n\r\n" not in received:
                received += connection.recv(65536)
            head, body = received.split(b"\r\n\r\n", 1)
            length = int(
                next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            )
            while len(body) < length:
                body += connection.recv(65536)
            self.requests.append(json.loads(body))
            tail = b"X-Slow: " + b"a" * 100_000 if self.endless else b"Content-Length: 0\r\n\r\n"
            try:
                for byte in self.answer + tail:
                    if self.stopped.wait(self.pause):
                        return
                    connection.sendall(bytes([byte]))
            except OSError:  # the client shut the connection
                self.hung_up.set()

    def close(self):
        self.stopped.set()
        self.listener.close()


@pytest.fixture
def trickler():
    receivers = []

    def make(**options):
        receivers.append(Trickler(**options))
        return receivers[-1]

    yield make
    for receiver in receivers:
        receiver.close()


def within(seconds: float, function, *args, **kwargs):
    "Call `function` on a thread and wait at most `seconds` (a bound for a hang, far above the deadline under test)."
    answer = []
    worker = threading.Thread(target=lambda: answer.append(function(*args, **kwargs)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert answer, f"{function.__name__} was still waiting after {seconds} s"
    return answer[0]


def test_a_trickling_receiver_gets_no_more_than_the_deadline(trickler):
    from lifecycle.webhook import post_webhook

    receiver = trickler(pause=0.2)  # its answer would take over 5 hours, a byte every 0.2 s
    # 5 s: time enough for the request to reach the receiver on a busy machine; the answer never can
    delivered, line = within(60, post_webhook, receiver.url, {"version": "4"}, deadline=5)
    assert (delivered, line) == (False, "not delivered after 1 attempt (no answer within 5 s)")
    assert receiver.requests == [{"version": "4"}]
    assert receiver.hung_up.wait(60)  # the connection was shut: no thread lingers on the trickle
    slow_but_done = trickler(pause=0.01, endless=False)  # a whole answer, slowly, well within the deadline
    assert within(60, post_webhook, slow_but_done.url, {"version": "4"}) == (True, "delivered (HTTP 200)")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    "A self-signed certificate for localhost (openssl), and a server context holding it."
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            folder / "key.pem",
            "-out",
            folder / "cert.pem",
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return folder / "cert.pem", context


def test_under_tls_too(trickler, certificate, monkeypatch):
    "An untrusted certificate is final (one try, its reason); a trusted receiver that trickles is cut at the deadline."
    from lifecycle.webhook import post_webhook

    path, context = certificate
    receiver = trickler(pause=0.2, tls=context)
    assert within(60, post_webhook, receiver.url, {"version": "4"}, deadline=5) == (
        False,
        "not delivered after 1 attempt (TLS CERTIFICATE_VERIFY_FAILED)",
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(path))  # now this machine trusts it
    # 5 s: time enough for the handshake and the request on a busy machine; the trickled answer never can
    assert within(60, post_webhook, receiver.url, {"version": "4"}, deadline=5) == (
        False,
        "not delivered after 1 attempt (no answer within 5 s)",
    )
    assert receiver.requests == [{"version": "4"}] and receiver.hung_up.wait(60)


def test_a_trickling_receiver_holds_monitoring_no_longer_than_the_deadline(tmp_path, trickler):
    "raise_alerts as monitoring calls it (the default deadline): the alert waits in the outbox for the next run."
    from lifecycle.alerts import parse_rules, raise_alerts

    receiver = trickler(pause=0.5)
    rules = parse_rules("auc_low (critical): roc_auc < 0.65", "[monitor] alerts")
    now = datetime(2026, 12, 7, tzinfo=timezone.utc)
    result = within(120, raise_alerts, tmp_path, rules, {"roc_auc": 0.5}, now, webhook=receiver.url)
    assert result["delivery"] == "not delivered after 1 attempt (no answer within 10 s)"
    assert [alert["labels"]["alertname"] for alert in result["sent"]] == ["auc_low"]
    assert "1 alerts wait for the next run" in " ".join(result["statements"])
    state = json.loads((tmp_path / "alerts_state.json").read_text())
    assert [alert["labels"]["alertname"] for alert in state["outbox"]] == ["auc_low"]


# --- hostile input to replay and collect: set aside with a reason, counted, no traceback --------------------------

SECRET = "PX-SECRET-4711"  # a patient value planted in every bad line: it must never reach an output or an error


def hostile_lines(record: dict) -> list[bytes]:
    "Lines no reader makes a record of: bytes that are not UTF-8, a field over 131,072 characters, deep nesting."
    return [
        json.dumps({**record, "note": SECRET}).encode()[:-1] + b', "x": "\xff\xfe"}',
        json.dumps({**record, "note": SECRET + "x" * 140_000}).encode(),  # a long field is fine in JSON: kept
        json.dumps({**record, "note": SECRET}).encode()[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        json.dumps({**record, "note": SECRET}).encode()[:-1] + b', "x": ' + b"[" * 40 + b"]" * 40 + b"}",
    ]


@pytest.fixture(scope="module")
def small_project(tmp_path_factory):
    "A project whose registry holds one small champion (age, chol, sex), as the stream tests build it."
    return small_champion(tmp_path_factory.mktemp("holes-project"))


def test_replay_sets_hostile_lines_aside_and_counts_them(small_project, tmp_path):
    from conftest import run_lifecycle

    record = {"age": 61, "chol": 250, "sex": 1, "num": 1}
    visits = tmp_path / "visits.jsonl"
    visits.write_bytes(b"\n".join([json.dumps(record).encode(), *hostile_lines(record), json.dumps(record).encode()]))
    table = tmp_path / "visits.csv"
    table.write_bytes(
        b"age,chol,sex,num\n61,250,1,1\n"
        + b'61,"'
        + SECRET.encode()
        + b"x" * 140_000
        + b'",1,1\n'  # a field the CSV reader refuses
        + b"61,\xff\xfe,1,1\n"
        + b"45,180,0,0\n"
    )
    settings = small_project / "settings.ini"
    code, jsonl, _, stderr = run_lifecycle("replay", "--settings", settings, "--input", visits, "--json", check=0)
    assert (jsonl["records"], jsonl["scored"], jsonl["set_aside"]) == (3, 3, 3), jsonl  # the long JSON field is kept
    assert jsonl["set_aside_reasons"] == {"bytes that are not utf-8 text": 1, "JSON nested deeper than 32 levels": 2}
    code, text, _, stderr = run_lifecycle("replay", "--settings", settings, "--input", table, "--json", check=0)
    assert (text["records"], text["scored"], text["set_aside"]) == (2, 2, 2), text
    assert text["set_aside_reasons"] == {"a field over 131,072 characters": 1, "bytes that are not utf-8 text": 1}
    code, _, words, stderr = run_lifecycle("replay", "--settings", settings, "--input", table, check=0)
    assert "2 input lines set aside, not sent: a field over 131,072 characters (1); bytes that are not" in words
    assert "Traceback" not in stderr and SECRET not in stderr + words + json.dumps([jsonl, text])


def test_collect_sets_a_deeply_nested_line_aside_with_the_others(tmp_path):
    import pandas as pd
    from conftest import COLUMNS, HEART, run_lifecycle

    names = COLUMNS.split(", ")
    rows = pd.read_csv(HEART / "processed.cleveland.data", header=None, names=names, na_values="?").head(40)
    records = [
        json.dumps({k: (None if pd.isna(v) else v) for k, v in row.items()}).encode() for _, row in rows.iterrows()
    ]
    project = tmp_path / "jsonl"
    project.mkdir()
    (project / "visits.jsonl").write_bytes(b"\n".join([*records[:20], *hostile_lines({"age": 50}), *records[20:]]))
    (project / "settings.ini").write_text(
        "[data]\nsources = visits: visits.jsonl\ntarget = num\npositive = 1, 2, 3, 4\n"
    )
    code, run, _, stderr = run_lifecycle("run", "--settings", project / "settings.ini", "--stages", "collect", "--json")
    assert code == 0 and [stage["status"] for stage in run["stages"]] == ["ran"], stderr
    malformed = pd.read_parquet(next(project.glob("runs/*/collect/malformed.parquet")))
    assert malformed[["_line", "reason"]].values.tolist() == [
        [21, "bytes that are not utf-8 text"],
        [23, "JSON nested deeper than 32 levels"],
        [24, "JSON nested deeper than 32 levels"],
    ]
    assert run["stages"][0]["summary"]["lines_malformed"] == 3 and run["stages"][0]["summary"]["rows"] == 41


# --- the paired tests at their extremes, against plain reference implementations ----------------------------------

from fractions import Fraction  # noqa: E402  (the statistics tests' own imports, kept beside them)
from itertools import product  # noqa: E402
from math import comb  # noqa: E402

import numpy as np  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def reference_auc(labels, scores) -> Fraction:
    "The definition: the share of (positive, negative) pairs ranked the right way, ties one half, exactly."
    pairs = [(p, n) for p, yp in zip(scores, labels) if yp for n, yn in zip(scores, labels) if not yn]
    right = sum(Fraction(1) if p > n else Fraction(1, 2) if p == n else Fraction(0) for p, n in pairs)
    return right / len(pairs)


def reference_ranks(scores) -> list[Fraction]:
    "Midranks, from their definition: 1 + the scores below, + half the other scores equal."
    return [1 + sum(o < s for o in scores) + Fraction(sum(o == s for o in scores) - 1, 2) for s in scores]


def reference_permutation_p(labels, a, b) -> Fraction:
    "Every one of the 2^N swaps of the two models' ranks on a patient, each AUC from its definition."
    a, b = reference_ranks(a), reference_ranks(b)
    observed = abs(reference_auc(labels, b) - reference_auc(labels, a))
    hits = 0
    for swap in product((False, True), repeat=len(labels)):
        first = [y if s else x for x, y, s in zip(a, b, swap)]
        second = [x if s else y for x, y, s in zip(a, b, swap)]
        hits += abs(reference_auc(labels, second) - reference_auc(labels, first)) >= observed
    return Fraction(hits, 2 ** len(labels))


@st.composite
def tiny_paired(draw):
    "2 to 9 patients with both classes, two models' scores with many ties."
    size = draw(st.integers(2, 9))
    labels = draw(st.lists(st.integers(0, 1), min_size=size, max_size=size).filter(lambda y: 0 < sum(y) < size))
    scores = st.lists(st.integers(0, 3), min_size=size, max_size=size)
    return labels, draw(scores), draw(scores)


@settings(max_examples=150, deadline=None)
@given(tiny_paired())
def test_the_auc_test_on_tiny_groups_is_the_exact_permutation_test(case):
    "Fewer than 10 of a class: the p-value is exactly the share of the 2^N swaps as extreme (ties, one of a class)."
    from lifecycle.compare import delong_test

    labels, a, b = case
    result = delong_test(labels, a, b)
    assert result["method"] == "paired permutation"
    assert abs(result["p_value"] - float(reference_permutation_p(labels, a, b))) < 1e-12
    assert abs(result["difference"] - float(reference_auc(labels, b) - reference_auc(labels, a))) < 1e-12


def test_perfect_separation_both_ways_is_significant_and_rolls_back():
    "ROC AUC 0.000 against 1.000 on the same 80 patients: a significant drop, never 'not significantly (p = 1)'."
    from lifecycle.compare import compare_models, delong_test
    from lifecycle.rollback import judge_rollback, rollback_rules
    from lifecycle.tasks import BinaryTask

    labels = np.repeat([1, 0], 40)
    right, backwards = np.linspace(0.99, 0.01, 80), np.linspace(0.01, 0.99, 80)
    test, p_value = BinaryTask().realized_test("roc_auc", labels, right, backwards, 0.5, 0.5)  # rollback's test
    assert test == "paired permutation" and p_value == 1 / 2001  # no random swap of 2,000 is as extreme
    rules = rollback_rules({"rollback_margin": 0.05, "rollback_min_labels": 30})
    evidence = {"champion": 2, "previous": 1, "labeled": 80, "figures": {"champion": 0.0, "previous": 1.0}}
    decision = judge_rollback(rules, {**evidence, "test": test, "p_value": p_value, "alerts": []})
    assert decision["rollback"] and "paired permutation p = 0.0005" in decision["reasons"][0], decision
    assert delong_test(labels, right, right)["p_value"] == 1.0  # the same model: no difference
    verdict = compare_models(labels, right, backwards, 0.5, 0.5, rounds=200)
    assert (
        verdict["verdict"] == "worse" and "ROC AUC 0.000 against 1.000 (paired permutation p = " in verdict["headline"]
    )


def test_the_random_swaps_agree_with_every_swap():
    "Above 12 patients the swaps are drawn at random: their p-value is the exact one within its sampling error."
    from lifecycle.compare import permutation_auc_test

    rng = np.random.default_rng(3)
    for _ in range(5):
        labels = np.array([1] * 7 + [0] * 7)
        a, b = rng.integers(0, 4, 14), labels + rng.integers(0, 3, 14)
        exact = permutation_auc_test(labels, a, b, exact_up_to=14)
        drawn = permutation_auc_test(labels, a, b, rounds=4000, seed=5)
        assert abs(drawn - exact) <= 4 * np.sqrt(exact * (1 - exact) / 4000) + 1 / 4001, (drawn, exact)


def reference_mcnemar(only_a: int, only_b: int) -> tuple[Fraction, Fraction]:
    "Exact and mid-p two-sided McNemar p-values from the binomial definition (Fagerland et al. 2013), in fractions."
    discordant, smaller = only_a + only_b, min(only_a, only_b)
    tail = 2 * sum(Fraction(comb(discordant, x), 2**discordant) for x in range(smaller + 1))
    point = Fraction(comb(discordant, smaller), 2**discordant)
    return min(Fraction(1), tail), min(Fraction(1), tail - point)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 120), st.integers(0, 120), st.integers(0, 30))
def test_mcnemar_agrees_with_its_definition(only_a, only_b, both):
    from lifecycle.compare import mcnemar_test

    labels = np.ones(only_a + only_b + both, dtype=int)
    right_a = np.r_[np.ones(only_a), np.zeros(only_b), np.ones(both)]
    right_b = np.r_[np.zeros(only_a), np.ones(only_b), np.ones(both)]
    result = mcnemar_test(labels, right_a, right_b)
    exact, mid = reference_mcnemar(only_a, only_b)
    assert (result["only_a_right"], result["only_b_right"]) == (only_a, only_b)
    assert abs(result["p_value"] - float(exact)) <= 1e-12 * max(1.0, float(exact)) + 1e-300
    assert abs(result["mid_p_value"] - float(mid)) <= 1e-9 * float(mid) + 1e-300
    assert result["mid_p_value"] <= result["p_value"]


# --- the clinic's refusals in its own name --------------------------------------------------------------------------


def test_the_clinic_refuses_in_its_own_name(small_project):
    import os
    import subprocess

    from conftest import LIFECYCLE

    environment = {key: value for key, value in os.environ.items() if key != "LIFECYCLE_API_TOKEN"}
    done = subprocess.run(
        [str(LIFECYCLE), "clinic", "--settings", str(small_project / "settings.ini"), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )
    assert done.returncode == 1 and done.stderr == (
        "lifecycle: the clinic page on 0.0.0.0 needs a token: set LIFECYCLE_API_TOKEN "
        "(visitors open the page once with ?token=<token>)\n"
    ), done.stderr
