"""One project, resolved once: a settings file of another name, its prediction log outside the project, reached through
a symlink."""

import json
import math
import os
import signal
import subprocess
import time

import httpx
import pandas as pd
from conftest import FEATURES, LABELLER, LIFECYCLE, free_port, run_lifecycle


def _records(project, count):
    "Patients of the first run's test split as records, and their diagnoses (0 or 1)."
    run = json.loads((project / "first-run.json").read_text())
    clean = pd.read_parquet(project / "runs" / run["run_id"] / "prepare" / "clean.parquet")
    rows = clean[clean["_split"] == "test"].head(count)
    records = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in zip(FEATURES, row)}
        for row in rows[FEATURES].itertuples(index=False, name=None)
    ]
    return records, [int(value) for value in rows["_label"]]


def _serve(settings, port, output):
    process = subprocess.Popen(
        [str(LIFECYCLE), "serve", "--settings", str(settings), "--port", str(port)],
        stdout=open(output, "w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, output.read_text()
        time.sleep(0.1)


def _count(log_file, project):
    from lifecycle.serving.predlog import open_log

    with open_log(str(log_file), project) as log:
        return log.count(), len(log.labels())


def test_prod_ini_with_its_log_elsewhere_through_a_symlink_is_one_project(champion_project, tmp_path):
    """serve (through the symlink), kill -9, the monitor stage of `lifecycle run`, `lifecycle monitor` (by the real
    path), retrain's rollback rules and policy, and the dashboard all read and write the one log the settings name."""
    from lifecycle.core import PAGE_SETTINGS_ENV, open_project
    from lifecycle.dashboard import dashboard_project, read_state
    from lifecycle.registry import Registry, load_model, register, set_alias

    real = champion_project
    for name in ("predictions.sqlite", "predictions.sqlite-wal", "predictions.sqlite-shm"):
        (real / name).unlink(missing_ok=True)  # the default log is gone: nothing may read or make it
    elsewhere = tmp_path / "logs" / "heart.sqlite"
    text = (real / "settings.ini").read_text()
    (real / "settings.ini").unlink()  # nothing may fall back on a settings.ini by name
    (real / "prod.ini").write_text(text.replace("[deploy]\n", f"[deploy]\nlog = {elsewhere}\n", 1))
    link = tmp_path / "link"
    link.symlink_to(real)
    project = open_project(link / "prod.ini")
    assert project.root == real.resolve() and project.log_url == str(elsewhere)

    # a run through the symlink: deploy replays the production traffic into the log the settings name, monitor reads it
    code, run, _, stderr = run_lifecycle(
        "run", "--settings", link / "prod.ini", "--stages", "deploy,monitor", "-p", "prepare.profile=false", "--json"
    )
    assert code == 0, stderr
    deployed = json.loads((real / "runs" / run["run_id"] / "monitor" / "summary.json").read_text())
    replayed, replay_labels = _count(elsewhere, real)
    assert replayed > 100 and replay_labels > 50, (replayed, replay_labels)
    assert (deployed["predictions"], deployed["labeled"]) == (
        replayed,
        replay_labels,
    )  # the stage read the log deploy wrote

    # a promotion for the rollback rules to watch: a copy of the champion, gated as it was
    registry = Registry(real)
    first = registry.resolve("champion")
    meta = {k: v for k, v in registry.meta(first).items() if k not in ("version", "sha256", "bytes", "created")}
    second = register(registry, load_model(registry, first), meta)
    set_alias(registry, "champion", second, "test: a promotion to watch")

    # serve through the symlink; every answered prediction is logged even after kill -9, in the log the settings name
    records, labels = _records(real, 40)
    port = free_port()
    server = _serve(link / "prod.ini", port, tmp_path / "serve.log")
    answered = []
    try:
        for record, label in zip(records, labels):
            answer = httpx.post(f"http://127.0.0.1:{port}/predict", json=[record], timeout=30)
            assert answer.status_code == 200, answer.text
            request_id = answer.json()["predictions"][0]["request_id"]
            assert (
                httpx.post(
                    f"http://127.0.0.1:{port}/feedback",
                    json={"request_id": request_id, "label": label},
                    headers=LABELLER,
                    timeout=30,
                ).status_code
                == 202
            )
            answered.append(request_id)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait(30)
    assert len(answered) == 40

    # `lifecycle monitor` by the real path: the killed server's journal is replayed from the one journal folder of this
    # log
    code, summary, _, stderr = run_lifecycle("monitor", "--settings", real / "prod.ini", "--json")
    assert code in (0, 3), stderr
    assert (summary["new_predictions"], summary["champion"]) == (40, second), summary
    assert _count(elsewhere, real) == (replayed + 40, replay_labels + 40)
    assert not list((real / ".lifecycle" / "journal").glob("*/*.jsonl"))

    # retrain: the rollback rules and the policy count the labels of this log
    code, retrained, _, stderr = run_lifecycle(
        "retrain",
        "--settings",
        link / "prod.ini",
        "--json",
        "-p",
        "retrain.min_new_labels=1000",
        "-p",
        "retrain.rollback_min_labels=1000",
    )
    assert code == 0, stderr
    assert retrained["status"] == "not now", retrained
    assert (
        "40 of the new champion's predictions have labels (rule: 1000): too few to compare yet"
        in retrained["rollback"]["checked"]
    )
    assert "40 predictions since the champion's promotion have labels (rule: 1000)" in retrained["decision"]["checked"]

    # the dashboard's page, as its command starts it (the settings file named in the environment): the same log
    os.environ[PAGE_SETTINGS_ENV] = str(link / "prod.ini")
    try:
        page = dashboard_project()
    finally:
        del os.environ[PAGE_SETTINGS_ENV]
    assert page == project
    state = read_state(page)
    assert state["last_prediction"] is not None and state["windows"] is not None

    assert not (real / "predictions.sqlite").exists() and not (real / "settings.ini").exists()
    assert not (link / "predictions.sqlite").exists()
