"""The live dashboard for real: `lifecycle dashboard` (Voila, a preheated kernel, a monitor beside it) in Debian's
chromium."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import LIFECYCLE, descendants, free_port
from sklearn.linear_model import LogisticRegression

from lifecycle.registry import Registry, register, set_alias
from lifecycle.serving.predlog import open_log
from lifecycle.train import reference_statistics

NUMERIC = ["age", "pressure", "chol"]
MONDAY = pd.Timestamp("2024-05-06", tz="UTC")
SCREENSHOT = os.environ.get("LIFECYCLE_DASHBOARD_SCREENSHOT")  # where to keep the picture (docs/screenshots.py sets it)


def _features(rng, rows, drifted=False):
    frame = pd.DataFrame(
        {"age": rng.normal(55, 9, rows), "pressure": rng.normal(130, 17, rows), "chol": rng.normal(240, 50, rows)}
    )
    frame["sex"] = rng.choice([0, 1], rows, p=[0.3, 0.7])
    frame["cp"] = rng.choice([1, 2, 3, 4], rows, p=[0.1, 0.2, 0.3, 0.4])
    if drifted:  # an older population, another mix of chest pain, and a hospital that stopped measuring cholesterol
        frame["age"] += 12
        frame["cp"] = rng.choice([1, 2, 3, 4], rows, p=[0.05, 0.05, 0.1, 0.8])
        frame["chol"] = np.nan
    return frame


@pytest.fixture
def project(tmp_path):
    """A project whose champion's reference.json comes from the real reference_statistics, its [monitor] refreshing
    every 2 s."""
    rng = np.random.default_rng(5)
    train = _features(rng, 3000)
    labels = (rng.random(3000) < 1 / (1 + np.exp(-(train["age"] - 55) / 6))).astype(int)
    model = LogisticRegression(max_iter=500).fit(train[NUMERIC].fillna(240), labels)
    scores = model.predict_proba(train[NUMERIC])[:, 1]
    reference = reference_statistics(train, NUMERIC, ["sex", "cp"], scores, labels)
    registry = Registry(tmp_path)
    version = register(
        registry,
        model,
        {
            "threshold": 0.5,
            "model": "logistic_regression",
            "features": {"numeric": NUMERIC, "categorical": ["sex", "cp"]},
        },
        {"reference.json": json.dumps(reference)},
    )
    set_alias(registry, "champion", version, "test")
    (tmp_path / "settings.ini").write_text(
        "[data]\nsources = a: a.csv\ntarget = y\npositive = 1\nsensitive = sex\n"
        "title = Heart disease at <Test> clinic\npositive_label = heart disease\n"
        "names = age: age\n        pressure: resting blood pressure\n"
        "        chol: serum cholesterol\n        cp: chest pain type\n"
        "units = age: years\n        pressure: mm Hg\n        chol: mg/dl\n"
        "labels = sex: 0 = female, 1 = male\n\n"
        "[monitor]\nwindow = week\nbootstrap = 50\nmin_group = 10\nrefresh_seconds = 2\n"
        "kpis = missed_per_week: fn / weeks\n       alarms_per_day: positives / days\n"
        "alerts = drift (critical): drift_share > 0.3\n"
    )
    return tmp_path, model


def _log_week(log, model, rng, start, rows, drifted, prefix, labelled=0.0):
    features = _features(rng, rows, drifted)
    scores = model.predict_proba(features[NUMERIC].fillna(240))[:, 1]
    decisions = (scores >= 0.5).astype(int)
    ids = [f"{prefix}{i}" for i in range(rows)]
    if drifted:  # the batch path: one block
        log.record_many(
            ids, scores, decisions, features, model_version=1, channel="batch", time=start + pd.Timedelta(days=1)
        )
    else:
        times = start + pd.to_timedelta(np.linspace(0, 6.9 * 86400, rows).round(), unit="s")
        records = features.astype(object).where(features.notna(), None).to_dict("records")
        log.record(
            [
                {
                    "request_id": ids[i],
                    "time": times[i].to_pydatetime(),
                    "model_version": 1,
                    "channel": "online",
                    "score": float(scores[i]),
                    "decision": int(decisions[i]),
                    "features": records[i],
                }
                for i in range(rows)
            ]
        )
    for i in range(int(rows * labelled)):
        log.record_label(ids[i], int(rng.random() < scores[i]), (start + pd.Timedelta(days=9)).isoformat())
    log.flush()


def _alive(pid: int) -> bool:
    try:
        state = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return " Z " not in state + " "  # a zombie has exited


def _wait_gone(pids: list[int], bound: float = 60) -> None:
    "Wait until none of `pids` is alive, up to `bound` seconds (a bound for a process that never exits, not a measure)."
    deadline = time.monotonic() + bound
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def _start(project_root, port, env=None, *extra):
    out = open(project_root / "dashboard.log", "w")
    process = subprocess.Popen(
        [str(LIFECYCLE), "dashboard", "--settings", str(project_root / "settings.ini"), "--port", str(port), *extra],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 180
    while "Dashboard: http" not in (project_root / "dashboard.log").read_text():
        assert process.poll() is None, (project_root / "dashboard.log").read_text()
        assert time.monotonic() < deadline, "the dashboard did not start within 180 s"
        time.sleep(0.3)
    return process


def _page_text(page) -> str:
    return page.evaluate("document.body.innerText")


def _wait_for(page, words, seconds=120):
    "Poll the page's text until every word is in it (a generous bound: never a speed assertion)."
    deadline = time.monotonic() + seconds
    while True:
        text = _page_text(page)
        if all(word in text for word in words):
            return text
        assert time.monotonic() < deadline, (
            f"{[w for w in words if w not in text]} not on the page after {seconds} s:\n{text[:3000]}"
        )
        time.sleep(1)


def test_the_live_page_shows_new_drift_and_its_alert_without_a_reload(project, browser):
    root, model = project
    rng = np.random.default_rng(9)
    with open_log("", root) as log:
        _log_week(log, model, rng, MONDAY, 400, False, "w1-", labelled=0.8)
        _log_week(log, model, rng, MONDAY + pd.Timedelta(days=7), 400, False, "w2-")
    port = free_port()
    process = _start(root, port)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems = []
        page.on(
            "console",
            lambda message: (
                problems.append(f"console {message.type}: {message.text}") if message.type == "error" else None
            ),
        )
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
        text = _wait_for(
            page,
            ["model in service", "version 1", "week of 13 May 2024", "No alert is firing", "serum cholesterol (mg/dl)"],
        )
        assert "Heart disease at <Test> clinic" in text  # escaped in HTML, shown as written
        assert "week of 20 May 2024" not in text
        for banned in ("Traceback", "Error", "There was an error", "w1-", "w2-"):  # no error output, no request id
            assert banned not in text, banned
        before = len(text)

        with open_log("", root) as log:  # while the page is open
            _log_week(log, model, rng, MONDAY + pd.Timedelta(days=14), 400, True, "w3-")
        text = _wait_for(page, ["week of 20 May 2024", "CRITICAL · drift: drift_share > 0.3 holds"])
        assert "drifted" in text and "No alert is firing" not in text
        assert page.evaluate("performance.getEntriesByType('navigation').length") == 1  # no reload happened
        assert "Traceback" not in text and "w3-" not in text
        assert problems == [], problems
        assert before > 0
        page.set_viewport_size({"width": 1280, "height": 1800})  # the whole page: Voila scrolls inside its own frame
        page.wait_for_timeout(2500)  # let the figures finish drawing before the picture
        picture = Path(SCREENSHOT) if SCREENSHOT else root / "dashboard.png"
        page.screenshot(path=str(picture), full_page=True)
        assert picture.stat().st_size > 10_000
        page.close()
    finally:
        children = descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    log_text = (root / "dashboard.log").read_text()
    assert code == 0, log_text
    _wait_gone(children)
    assert [pid for pid in children if _alive(pid)] == [], "kernels or Voila outlived the dashboard"
    status = json.loads((root / "monitoring" / "monitor_status.json").read_text())
    assert status["error"] is None and status["windows"] == 3


def test_a_token_is_required_off_loopback_and_enforced_when_set(project):
    root, _ = project
    env = {key: value for key, value in os.environ.items() if key != "LIFECYCLE_API_TOKEN"}
    done = subprocess.run(
        [
            str(LIFECYCLE),
            "dashboard",
            "--settings",
            str(root / "settings.ini"),
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1
    assert "needs a token: set LIFECYCLE_API_TOKEN" in done.stderr and "Traceback" not in done.stderr
    assert not (root / "monitoring").exists()  # nothing started

    port = free_port()
    process = _start(root, port, {"LIFECYCLE_API_TOKEN": "s3cret-token-for-pages"})
    try:
        assert "s3cret-token-for-pages" not in _command_line(process.pid)
        refused = httpx.get(f"http://127.0.0.1:{port}/", timeout=60, follow_redirects=False)
        assert refused.status_code in (302, 403), refused.status_code
        assert "Monitoring" not in refused.text
        allowed = httpx.get(
            f"http://127.0.0.1:{port}/?token=s3cret-token-for-pages", timeout=120, follow_redirects=True
        )
        assert allowed.status_code == 200
        commands = [_command_line(pid) for pid in descendants(process.pid)]
        assert commands and not any(
            "s3cret-token-for-pages" in command for command in commands
        )  # never on a command line
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0


def test_an_empty_project_is_a_statement_not_an_error(tmp_path, browser):
    "No champion, no prediction, no monitoring results yet: the page says so in words, with no error anywhere."
    (tmp_path / "settings.ini").write_text(
        "[data]\nsources = a: a.csv\ntarget = y\npositive = 1\n\n[monitor]\nrefresh_seconds = 2\n"
    )
    port = free_port()
    process = _start(tmp_path, port)
    try:
        page = browser.new_page()
        problems = []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
        text = _wait_for(
            page,
            [
                "model in service",
                "none yet",
                "the log holds no predictions",
                "No alert is firing",
                "No predictions have been monitored yet",
                "No window has been judged for drift yet",
            ],
        )
        page.wait_for_timeout(5000)  # a few refreshes, the monitor having run on the empty log
        text = _page_text(page)
        assert "Traceback" not in text and "Error" not in text and "failed" not in text
        assert problems == [], problems
        page.close()
    finally:
        children = descendants(process.pid)
        process.send_signal(signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=120) == 0
    _wait_gone(children)
    assert children and [pid for pid in children if _alive(pid)] == [], "Voila or a kernel outlived Ctrl-C"
    status = json.loads((tmp_path / "monitoring" / "monitor_status.json").read_text())
    assert status["error"] is None and status["windows"] == 0


def test_voila_serves_no_file_from_beside_the_notebook(tmp_path):
    "Voila serves images next to its notebook by default; the dashboard's command line serves none."
    from lifecycle.dashserver import voila_command, wait_for_port

    (tmp_path / "monitoring_dashboard.ipynb").write_bytes(
        (Path(__file__).parent.parent / "nbs" / "monitoring_dashboard.ipynb").read_bytes()
    )
    (tmp_path / "figure.png").write_bytes(b"\x89PNG not a real picture")
    statuses = {}
    for name, keep in (("dashboard", lambda part: True), ("voila default", lambda part: "denylist" not in part)):
        port = free_port()
        command = [
            part
            for part in voila_command(tmp_path / "monitoring_dashboard.ipynb", port=port, preheat=False, template=None)
            if keep(part)
        ]
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "LIFECYCLE_DASHBOARD_ROOT": str(tmp_path)},
        )
        try:
            wait_for_port("127.0.0.1", port, process)
            statuses[name] = httpx.get(f"http://127.0.0.1:{port}/voila/files/figure.png", timeout=60).status_code
        finally:
            process.terminate()
            process.wait(timeout=60)
    assert statuses == {"dashboard": 403, "voila default": 200}
