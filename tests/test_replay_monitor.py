"`lifecycle replay` and `lifecycle monitor` as a user runs them, on the default project after a whole run."

import configparser
import json
import os
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone

import httpx
import numpy as np
import pandas as pd
from conftest import LIFECYCLE, free_port, run_lifecycle, stages

from lifecycle.serving.predlog import open_log

VA = "data/heart-disease-uci/processed.va.data"
SWITZERLAND = "data/heart-disease-uci/processed.switzerland.data"
# The record contract refuses a record with more than half its features missing (too_many_missing): 53 of VA's 200
# patients, 1 of Switzerland's 123. The others are scored, logged and monitored.
VA_SCORED, SWITZERLAND_SCORED = 147, 122
SCORED = VA_SCORED + SWITZERLAND_SCORED


def set_monitor(project, **values):
    "Edit the project's [monitor] section as a user would."
    path = project / "settings.ini"
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(path)
    for key, value in values.items():
        parser["monitor"][key] = value
    with open(path, "w") as handle:
        parser.write(handle)


def windows_of(project) -> pd.DataFrame:
    frame = pd.read_parquet(project / "monitoring" / "windows.parquet")
    for column in ("window_start", "first_event", "last_event"):
        frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
    return frame


def test_the_run_ends_with_a_month_of_history(champion_project):
    "make run: deploy replays the production files over 30 days, and the monitor stage reports on them."
    run = json.loads((champion_project / "first-run.json").read_text())
    deploy, monitor = stages(run)["deploy"]["summary"], stages(run)["monitor"]["summary"]
    assert (
        deploy["replay"]["scored"] == deploy["production"]["scored"] == SCORED
        and deploy["production"]["rejected"] == 323 - SCORED
    )
    assert deploy["replay"]["labels_sent"] > 150 and deploy["replay"]["labels_pending"] > 20
    first = datetime.fromisoformat(deploy["replay"]["first_event"][:19]).replace(tzinfo=timezone.utc)
    last = datetime.fromisoformat(deploy["replay"]["last_event"][:19]).replace(tzinfo=timezone.utc)
    assert last - first > timedelta(days=25)
    assert (
        monitor["windows"] >= 5
        and monitor["predictions"] == SCORED
        and monitor["labeled"] == deploy["replay"]["labels_sent"]
    )
    assert monitor["headline"].startswith(f"{monitor['windows']} windows") and monitor["figure"] == "monitoring.png"
    assert (champion_project / "runs" / run["run_id"] / "monitor" / "monitoring.png").stat().st_size > 10_000
    # each hospital beside the pool: the replay sent each row with its source's name as its site
    windows = windows_of(champion_project)
    assert set(windows["sites"]) <= {1, 2} and windows["sites"].max() == 2
    latest = windows.sort_values("window_start", kind="stable").iloc[-1]
    details = json.loads((champion_project / "monitoring" / "details" / f"{latest['window']}.json").read_text())
    assert set(details["sites"]) == {"switzerland", "va"}
    assert sum(part["values"]["predictions"] for part in details["sites"].values()) == latest["predictions"]
    # the stage again (deploy cached): nothing replayed twice
    _, again, _, _ = run_lifecycle(
        "run", "--settings", champion_project / "settings.ini", "-p", "prepare.profile=false", "--json", check=0
    )  # as the template ran
    # nothing new in the log either: the monitor's outputs are reused, with the same figures
    assert stages(again)["deploy"]["status"] == "cached" and stages(again)["monitor"]["status"] == "cached"
    assert stages(again)["monitor"]["summary"]["predictions"] == SCORED


def test_replay_then_monitor(champion_project):
    project, settings = champion_project, champion_project / "settings.ini"
    set_monitor(project, log="replayed.sqlite", window="day", min_rows="5")  # a log of its own, windows of a day
    (project / "monitoring").rename(project / "monitoring-of-the-run")  # the stage's results were of the run's log
    started = datetime.now(timezone.utc)
    _, va, _, _ = run_lifecycle(
        "replay", "--input", project / VA, "--settings", settings, "--log", "replayed.sqlite", "--json", check=0
    )
    _, swiss, _, _ = run_lifecycle(
        "replay",
        "--input",
        project / SWITZERLAND,
        "--settings",
        settings,
        "--log",
        "replayed.sqlite",
        "--seed",
        "1",
        "--days",
        "30",
        "--label-delay",
        "7",
        "--label-share",
        "0.8",
        "--json",
        check=0,
    )
    assert (va["records"], va["scored"], va["scoring"], va["event_times"]) == (
        200,
        VA_SCORED,
        "in-process",
        "simulated",
    )
    assert (
        swiss["scored"] == SWITZERLAND_SCORED
        and swiss["labels_sent"] + swiss["labels_pending"] + swiss["labels_never"] == SWITZERLAND_SCORED
    )
    assert va["labels_pending"] > 10 and swiss["labels_pending"] > 5
    replayed_at = datetime.now(timezone.utc)

    code, summary, _, _ = run_lifecycle("monitor", "--settings", settings, "--json")
    assert code == 0, summary  # the critical rules need labels, which the latest day does not have yet
    assert summary["new_predictions"] == SCORED and summary["new_labels"] == va["labels_sent"] + swiss["labels_sent"]
    windows = windows_of(project)
    # event times spread over the days: a window a day, over the month before now
    assert len(windows) >= 25 and windows["predictions"].sum() == SCORED
    assert windows["first_event"].min() >= pd.Timestamp(started - timedelta(days=30, minutes=5))
    assert windows["last_event"].max() <= pd.Timestamp(datetime.now(timezone.utc))
    # labels: the last week's still pending, the earlier weeks' realized (most of them)
    recent = windows[
        windows["first_event"] >= pd.Timestamp(replayed_at - timedelta(days=7))
    ]  # every label due after the replays
    older = windows[windows["last_event"] < pd.Timestamp(started - timedelta(days=7, minutes=5))]
    assert len(recent) >= 6 and recent["labeled"].sum() == 0
    assert older["labeled"].sum() > 0.6 * older["predictions"].sum()
    assert (
        older["roc_auc"].notna().sum() >= 5
        and recent["roc_auc"].isna().all()
        and recent["estimated_roc_auc"].notna().all()
    )
    # a hospital that stops measuring cholesterol (Switzerland: every chol is 0, "not measured"): missing share drift
    assert windows["missing_share.chol"].mean() > 0.2
    assert windows["drift.chol"].mean() > 0.5

    # late labels arrive (as feedback would bring them): the pending windows become realized
    log = open_log("replayed.sqlite", project)
    pending = log.predictions()
    pending = pending[pending["event_time"] >= recent["window_start"].min()]  # the predictions of those windows
    for request_id in pending["request_id"]:
        log.record_label(request_id, 1)
    assert log.flush() and len(pending) > 20
    log.close()
    code, summary, _, _ = run_lifecycle("monitor", "--settings", settings, "--json")
    assert summary["new_labels"] >= len(pending) and summary["new_predictions"] == 0
    after = windows_of(project).set_index("window")
    assert after.loc[recent["window"], "labeled"].sum() == len(pending)
    assert summary["latest"]["values"]["labeled"] == summary["latest"]["values"]["predictions"]

    # another replay after the monitor looked: its labels became known in the past, and are counted all the same
    _, more, _, _ = run_lifecycle(
        "replay",
        "--input",
        project / VA,
        "--settings",
        settings,
        "--log",
        "replayed.sqlite",
        "--seed",
        "2",
        "--json",
        check=0,
    )
    _, summary, _, _ = run_lifecycle("monitor", "--settings", settings, "--json")
    assert (
        summary["new_predictions"] == VA_SCORED and summary["new_labels"] >= more["labels_sent"] > VA_SCORED // 2
    )  # 80% labelled, less the last week's
    assert (
        windows_of(project)["labeled"].sum()
        == va["labels_sent"] + swiss["labels_sent"] + len(pending) + more["labels_sent"]
    )

    # a critical rule that holds: exit code 3, in JSON and in words
    set_monitor(
        project,
        alerts="traffic_seen (critical): predictions >= 1\nchol_not_measured (warning): missing_share.chol > 0.3",
    )
    code, summary, _, _ = run_lifecycle("monitor", "--settings", settings, "--json")
    assert code == 3 and summary["exit_code"] == 3
    assert any(alert["labels"]["alertname"] == "traffic_seen" for alert in summary["alerts"]["firing"])
    code, _, out, _ = run_lifecycle("monitor", "--settings", settings)
    assert code == 3 and "CRITICAL traffic_seen" in out and "Latest window" in out
    assert (project / "monitoring" / "alerts.jsonl").exists()
    # a user error: exit code 1, one line
    set_monitor(project, window="fortnight")
    code, _, _, err = run_lifecycle("monitor", "--settings", settings)
    assert code == 1 and err.count("\n") == 1 and "[monitor] window" in err


def test_replay_over_http_scores_as_in_process(champion_project):
    """The same file replayed over HTTP against a real lifecycle serve (with a token) and in-process: the same scores at
    the same event times."""
    project, settings = champion_project, champion_project / "settings.ini"
    port, token = free_port(), "t0ken-for-replay"
    # the scoring token for /predict, the default project's labeller (lab) for /feedback
    labeller = os.environ["LIFECYCLE_LABELLER_LAB"]
    environment = {
        **os.environ,
        "LIFECYCLE_API_TOKEN": token,
        "LIFECYCLE_LABELLER_TOKEN": labeller,
        "OMP_NUM_THREADS": "1",
    }
    output = project / "serve.log"
    server = subprocess.Popen(
        [str(LIFECYCLE), "serve", "--settings", str(settings), "--port", str(port), "--log", "served.sqlite"],
        stdout=open(output, "w"),
        stderr=subprocess.STDOUT,
        env=environment,
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.time() < deadline, output.read_text()
            time.sleep(0.1)
        no_token = subprocess.run(
            [
                str(LIFECYCLE),
                "replay",
                "--input",
                str(project / SWITZERLAND),
                "--settings",
                str(settings),
                "--url",
                f"http://127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            env={k: v for k, v in environment.items() if k != "LIFECYCLE_API_TOKEN"},
        )
        assert no_token.returncode == 1 and "LIFECYCLE_API_TOKEN" in no_token.stderr
        over_http = subprocess.run(
            [
                str(LIFECYCLE),
                "replay",
                "--input",
                str(project / SWITZERLAND),
                "--settings",
                str(settings),
                "--url",
                f"http://127.0.0.1:{port}",
                "--seed",
                "5",
                "--json",
            ],
            capture_output=True,
            text=True,
            env=environment,
        )
        assert over_http.returncode == 0, over_http.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    _, in_process, _, _ = run_lifecycle(
        "replay",
        "--input",
        project / SWITZERLAND,
        "--settings",
        settings,
        "--log",
        "in-process.sqlite",
        "--seed",
        "5",
        "--json",
        check=0,
    )
    http = json.loads(over_http.stdout)
    assert http["scoring"] == "http" and in_process["scoring"] == "in-process"
    assert {key: http[key] for key in ("scored", "labels_sent", "labels_pending")} == {
        key: in_process[key] for key in ("scored", "labels_sent", "labels_pending")
    }
    served, local = (open_log(name, project) for name in ("served.sqlite", "in-process.sqlite"))
    a, b = (log.predictions().sort_values("event_time", ignore_index=True) for log in (served, local))
    assert len(a) == len(b) == SWITZERLAND_SCORED
    assert (
        np.array_equal(a["score"].to_numpy(), b["score"].to_numpy())
        and a["decision"].tolist() == b["decision"].tolist()
    )
    shift = b["event_time"] - a["event_time"]  # the same arrivals, counted back from two slightly different "now"s
    assert shift.nunique() <= 3 and abs(shift.iloc[0]) < pd.Timedelta(minutes=10)
    assert len(served.labels()) == len(local.labels()) == http["labels_sent"]
    served.close()
    local.close()


def test_monitor_watch_repeats_until_interrupted(champion_project):
    """lifecycle monitor --watch: one JSON object a line, each look a new one, until Ctrl-C; the exit code of the last
    look."""
    settings = champion_project / "settings.ini"
    set_monitor(champion_project, alerts="traffic_seen (critical): predictions >= 1")
    watcher = subprocess.Popen(
        [str(LIFECYCLE), "monitor", "--settings", str(settings), "--watch", "0.2", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    looks = [json.loads(watcher.stdout.readline()) for _ in range(3)]
    watcher.send_signal(signal.SIGINT)
    assert watcher.wait(timeout=60) == 3
    assert [look["exit_code"] for look in looks] == [3, 3, 3]
    assert (
        looks[0]["windows"] == looks[2]["windows"] >= 5 and looks[2]["new_predictions"] == 0
    )  # nothing new: nothing recomputed
    code, _, _, err = run_lifecycle("monitor", "--settings", settings, "--watch", "0")
    assert code == 1 and "--watch takes a positive number" in err
