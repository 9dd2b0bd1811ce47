"""Monitoring on a real prediction log (SQLite, filled through the logging API) with planted drift, and alerts posted to
a real HTTP server."""

import json
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest
from conftest import free_port
from sklearn.linear_model import LogisticRegression

from lifecycle.core import open_project
from lifecycle.monitoring import monitor_project
from lifecycle.registry import Registry, register, set_alias
from lifecycle.serving.predlog import open_log
from lifecycle.train import reference_statistics

NUMERIC = [f"x{i}" for i in range(8)]
CATEGORY = ["site", "sex"]
MONDAY = pd.Timestamp("2024-05-06", tz="UTC")
PLANTED = {"x0", "x1", "site", "x5"}  # x0, x1 shifted; site's mix changed; x5 no longer measured


def _features(rng, rows, drifted=False):
    frame = pd.DataFrame({name: rng.normal(10 * i, 1 + i, rows) for i, name in enumerate(NUMERIC)})
    frame["site"] = rng.choice(["a", "b", "c"], rows, p=[0.5, 0.3, 0.2])
    frame["sex"] = rng.choice([0, 1], rows, p=[0.3, 0.7])
    if drifted:
        frame["x0"] += 1.0  # one standard deviation
        frame["x1"] += 0.8 * 2
        frame["site"] = rng.choice(["a", "b", "c"], rows, p=[0.1, 0.2, 0.7])
        frame["x5"] = np.nan
    return frame


@pytest.fixture
def project(tmp_path):
    "A project with a champion whose reference.json is made by the real reference_statistics (5,000 training rows)."
    rng = np.random.default_rng(7)
    train = _features(rng, 5000)
    labels = (rng.random(5000) < 1 / (1 + np.exp(-(train["x0"] - 0)))).astype(int)
    model = LogisticRegression(max_iter=500).fit(train[NUMERIC[:3]], labels)
    scores = model.predict_proba(train[NUMERIC[:3]])[:, 1]
    reference = reference_statistics(train, NUMERIC, CATEGORY, scores, labels)
    registry = Registry(tmp_path)
    version = register(
        registry,
        model,
        {"threshold": 0.5, "features": {"numeric": NUMERIC[:3], "categorical": []}},
        {"reference.json": json.dumps(reference)},
    )
    set_alias(registry, "champion", version, "test")
    (tmp_path / "settings.ini").write_text(
        "[data]\nsources = a: a.csv\ntarget = y\npositive = 1\nsensitive = sex\n\n"
        "[monitor]\nwindow = week\nbootstrap = 50\n"
        "kpis = missed_per_week: fn / weeks\n"
        "alerts = drift (critical): drift_share > 0.3\n         sites (warning): drift.site > 0\n"
    )
    return tmp_path, model


def _log_week(log, model, rng, start, rows, drifted, prefix, as_block=False):
    features = _features(rng, rows, drifted)
    scores = model.predict_proba(features[NUMERIC[:3]])[:, 1]
    decisions = (scores >= 0.5).astype(int)
    ids = [f"{prefix}{i}" for i in range(rows)]
    if as_block:  # the batch path: one Parquet block
        log.record_many(
            ids, scores, decisions, features, model_version=1, channel="batch", time=start + pd.Timedelta(days=2)
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
    log.flush()
    return ids, scores


def _windows(root):
    table = pd.read_parquet(root / "monitoring" / "windows.parquet").set_index("window")
    return table


def _flagged(root, window):
    details = json.loads((root / "monitoring" / "details" / f"{window}.json").read_text())
    return {row["feature"] for row in details["features"] if row["drift"]}


class _Receiver(BaseHTTPRequestHandler):
    received = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_planted_drift_is_found_and_alerts_fire_repeat_and_resolve(project):
    root, model = project
    rng = np.random.default_rng(11)
    t0 = datetime(2024, 6, 1, tzinfo=timezone.utc)
    closed = f"http://127.0.0.1:{free_port()}/alerts"  # nothing listens there
    with open_log("", root) as log:
        _log_week(log, model, rng, MONDAY, 3000, False, "clean-")
        drifted_ids, _ = _log_week(log, model, rng, MONDAY + pd.Timedelta(days=7), 3000, True, "drift-", as_block=True)

    first = monitor_project(open_project(root / "settings.ini"), now=t0, settings={"webhook": closed})
    windows = _windows(root)
    assert list(windows.index) == ["v1_2024-05-06", "v1_2024-05-13"]
    assert _flagged(root, "v1_2024-05-06") == set()
    assert _flagged(root, "v1_2024-05-13") == PLANTED
    assert windows.loc["v1_2024-05-13", "drift_share"] == pytest.approx(len(PLANTED) / 10)
    assert windows.loc["v1_2024-05-13", "missing_share.x5"] == 1.0
    # the receiver is down: monitoring still finishes, the critical alert is firing and waits in the outbox
    assert first["exit_code"] == 3
    assert sorted(alert["labels"]["alertname"] for alert in first["alerts"]["firing"]) == ["drift", "sites"]
    assert first["alerts"]["delivery"].startswith("not delivered after 3 attempts")
    assert any("wait for the next run" in line for line in first["statements"])
    assert len((root / "monitoring" / "alerts.jsonl").read_text().splitlines()) == 2

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/alerts"
    try:
        _Receiver.received.clear()
        # a restart (a new call, state read from the project): the waiting alerts are delivered, nothing fires twice
        second = monitor_project(
            open_project(root / "settings.ini"), now=t0 + timedelta(minutes=10), settings={"webhook": url}
        )
        assert second["alerts"]["sent"] == [] and second["alerts"]["delivery"] == "delivered (HTTP 200)"
        assert len(_Receiver.received) == 1
        payload = _Receiver.received[0]
        assert (payload["version"], payload["status"]) == ("4", "firing")
        assert {alert["labels"]["alertname"] for alert in payload["alerts"]} == {"drift", "sites"}
        assert all(
            set(alert) == {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
            for alert in payload["alerts"]
        )
        fingerprints = {alert["labels"]["alertname"]: alert["fingerprint"] for alert in payload["alerts"]}
        assert second["new_predictions"] == 0

        # still holding after the repeat interval (4 hours): sent again, same fingerprint and start
        third = monitor_project(
            open_project(root / "settings.ini"), now=t0 + timedelta(hours=5), settings={"webhook": url}
        )
        assert {alert["fingerprint"] for alert in third["alerts"]["sent"]} == set(fingerprints.values())
        assert len(_Receiver.received) == 2

        # a clean week arrives: the latest window is clean, both alerts resolve once
        with open_log("", root) as log:
            _log_week(log, model, rng, MONDAY + pd.Timedelta(days=14), 3000, False, "later-")
        fourth = monitor_project(
            open_project(root / "settings.ini"), now=t0 + timedelta(hours=6), settings={"webhook": url}
        )
        assert fourth["latest"]["window"] == "v1_2024-05-20" and fourth["exit_code"] == 0
        assert sorted((a["labels"]["alertname"], a["status"]) for a in fourth["alerts"]["sent"]) == [
            ("drift", "resolved"),
            ("sites", "resolved"),
        ]
        assert _Receiver.received[-1]["status"] == "resolved"
        fifth = monitor_project(
            open_project(root / "settings.ini"), now=t0 + timedelta(hours=12), settings={"webhook": url}
        )
        assert fifth["alerts"]["sent"] == [] and fifth["alerts"]["firing"] == []
        assert len(_Receiver.received) == 3
    finally:
        server.shutdown()
        server.server_close()

    # late labels: only their window is recomputed; realized metrics appear beside the estimates
    with open_log("", root) as log:
        for request_id in drifted_ids[:200]:
            log.record_label(request_id, 1, "2024-05-30T00:00:00Z")
        log.flush()
    before = _windows(root)
    late = monitor_project(open_project(root / "settings.ini"), now=t0 + timedelta(hours=13))
    after = _windows(root)
    assert late["new_labels"] == 200
    assert late["latest"]["window"] == "v1_2024-05-20" and late["latest"]["values"]["recall"] is None
    assert (
        late["latest"]["values"]["last_labeled.prevalence"] == 1.0
        and late["latest"]["values"]["last_labeled.labeled"] == 200
    )
    assert after.loc["v1_2024-05-13", "labeled"] == 200 and after.loc["v1_2024-05-06", "labeled"] == 0
    assert after.loc["v1_2024-05-13", "recall"] is not None and after.loc["v1_2024-05-13", "prevalence"] == 1.0
    details = json.loads((root / "monitoring" / "details" / "v1_2024-05-13.json").read_text())
    assert "all 200 labels are positive: ROC AUC is undefined" in details["statements"]
    assert details["values"]["missed_per_week"] == details["values"]["fn"]
    assert list(before.columns) == list(after.columns)
    untouched = [
        row.loc["v1_2024-05-06"].astype(object).where(row.loc["v1_2024-05-06"].notna(), None).to_dict()
        for row in (before, after)
    ]
    assert untouched[0] == untouched[1]


def test_version_change_mid_week_splits_the_window(project):
    root, model = project
    rng = np.random.default_rng(3)
    with open_log("", root) as log:
        _log_week(log, model, rng, MONDAY, 100, False, "a-")
        features = _features(rng, 50)
        log.record(
            [
                {
                    "request_id": f"b-{i}",
                    "time": (MONDAY + pd.Timedelta(days=3)).to_pydatetime(),
                    "model_version": 2,
                    "channel": "online",
                    "score": 0.4,
                    "decision": 0,
                    "features": {"x0": float(features["x0"][i])},
                }
                for i in range(50)
            ]
        )
        log.flush()
    result = monitor_project(open_project(root / "settings.ini"), now=datetime(2024, 6, 1, tzinfo=timezone.utc))
    assert sorted(_windows(root).index) == ["v1_2024-05-06", "v2_2024-05-06"]
    # version 1 is the champion: its window is the latest; it says another version served in the same week
    assert result["latest"]["window"] == "v1_2024-05-06"
    assert any("version(s) 2 served in it too" in line for line in result["latest"]["statements"])
    details = json.loads((root / "monitoring" / "details" / "v2_2024-05-06.json").read_text())
    assert "no reference statistics for this model version: drift is not judged" in details["statements"]
    json.dumps(result, allow_nan=False)


def test_webhook_retries_a_failing_receiver_then_delivers_and_gives_up_on_a_refusal():
    from lifecycle.alerts import post_webhook

    class Flaky(BaseHTTPRequestHandler):
        codes = []

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(type(self).codes.pop(0))
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    waits = []
    try:
        Flaky.codes[:] = [500, 503, 200]
        assert post_webhook(url, {"version": "4"}, sleep=waits.append) == (True, "delivered (HTTP 200)")
        assert waits == [0.2, 0.4] and Flaky.codes == []
        Flaky.codes[:] = [400, 200]  # the receiver refuses the payload: retrying would not help
        assert post_webhook(url, {"version": "4"}, sleep=waits.append) == (
            False,
            "not delivered after 1 attempt (HTTP 400)",
        )
        assert Flaky.codes == [200]
    finally:
        server.shutdown()
        server.server_close()


def test_a_site_whose_patients_degrade_alerts_though_the_pool_holds(project):
    """One hospital's patients degrade (their diagnoses turn against the scores) while the pool's ROC AUC holds: the
    site's alert fires with its `site` label and the pool's does not; a site of a handful of patients is said too small,
    not judged; the fleet puts the degraded site first."""
    root, model = project
    rng = np.random.default_rng(5)
    sizes = {"north": 900, "south": 120, "tiny": 12}
    features = _features(rng, sum(sizes.values()))
    features["_site"] = np.repeat(list(sizes), list(sizes.values()))
    scores = model.predict_proba(features[NUMERIC[:3]])[:, 1]
    risk = 1 / (1 + np.exp(-features["x0"].to_numpy()))
    degraded = (features["_site"] == "south").to_numpy()
    labels = (rng.random(len(features)) < np.where(degraded, 1 - risk, risk)).astype(int)
    times = MONDAY + pd.to_timedelta(np.linspace(0, 6.9 * 86400, len(features)).round(), unit="s")
    records = features.astype(object).where(features.notna(), None).to_dict("records")
    with open_log("", root) as log:
        log.record(
            [
                {
                    "request_id": f"p{i}",
                    "time": times[i].to_pydatetime(),
                    "model_version": 1,
                    "channel": "online",
                    "score": float(scores[i]),
                    "decision": int(scores[i] >= 0.5),
                    "features": records[i],
                }
                for i in range(len(features))
            ]
        )
        for i, label in enumerate(labels):
            log.record_label(f"p{i}", int(label), "2024-05-14T00:00:00Z")
        log.flush()
    rules = "auc_low (critical): roc_auc < 0.6\ndrift (warning): drift_share > 0.5"
    out = monitor_project(
        open_project(root / "settings.ini"), now=datetime(2024, 6, 1, tzinfo=timezone.utc), settings={"alerts": rules}
    )
    pooled, sites = out["latest"]["values"], out["latest"]["sites"]
    json.dumps(out, allow_nan=False)  # `lifecycle monitor --json`: each site's figures under latest.sites, no NaN
    assert pooled["roc_auc"] >= 0.6 and pooled["sites"] == 3  # the pool holds
    assert sites["south"]["roc_auc"] < 0.45 < 0.65 < sites["north"]["roc_auc"]
    firing = [(alert["labels"]["alertname"], alert["labels"].get("site")) for alert in out["alerts"]["firing"]]
    # south is miscalibrated too (the default calibration rule); nothing fires for the pool or the other sites
    assert sorted(firing) == [("auc_low", "south"), ("calibration_drift", "south")] and out["exit_code"] == 3
    assert out["alerts"]["firing"][0]["labels"]["project"] == root.name
    # the small site: counted, its figures not judged and said so in words
    assert sites["tiny"]["predictions"] == 12 and sites["tiny"]["roc_auc"] is None
    assert sites["tiny"]["drift_share"] is None and sites["tiny"]["estimated_roc_auc"] is None
    details = json.loads((root / "monitoring" / "details" / f"{out['latest']['window']}.json").read_text())
    said = details["sites"]["tiny"]["statements"]
    assert "12 predictions, fewer than 20: drift and estimates are not judged" in said
    assert any(
        "labelled sick patients, fewer than 20: measured accuracy and calibration are not judged" in line
        for line in said
    )
    # fairness per site, as the pool's: its groups by sex
    assert {row["group"] for row in details["sites"]["north"]["groups"]["sex"]} == {"sex 0", "sex 1"}
    from lifecycle.monitoring.sites import fleet_table

    fleet = fleet_table(sites, out["alerts"]["firing"])
    assert list(fleet["site"]) == ["south", "north", "tiny"] and fleet.loc[0, "alerts"] == "auc_low, calibration_drift"
    from lifecycle.monitor_words import monitor_text

    words = monitor_text(out)  # `lifecycle monitor` in words: the fleet, and the alert with its site
    assert "CRITICAL at site south: auc_low" in words
    assert words.index("Sites, worst first:\n  south: 120 predictions, ROC AUC measured") > 0


def test_a_request_s_site_reaches_the_log_through_the_real_app(tmp_path):
    "`X-Site` on /predict: each record's prediction is logged with its site; a header that is no name is a 422."
    import time

    from conftest import small_champion
    from fastapi.testclient import TestClient

    from lifecycle.serving.serve import create_app

    root = small_champion(tmp_path)
    app = create_app(root, log_url=str(root / "log.sqlite"))
    with TestClient(app) as client:
        for _ in range(200):  # a bound for a hang, not a measure of speed
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        record = {"age": 61, "chol": 240, "sex": 1}
        assert client.post("/predict", json=[record, record], headers={"X-Site": "VA Long Beach"}).status_code == 200
        assert client.post("/predict", json=record).status_code == 200  # no header: no site
        refused = client.post("/predict", json=record, headers={"X-Site": "<script>x</script>"})
        assert refused.status_code == 422 and "<script>" not in refused.text
    with open_log(str(root / "log.sqlite"), root) as log:
        logged = log.predictions()
    assert sorted(logged["_site"].fillna("none")) == ["VA Long Beach", "VA Long Beach", "none"]
