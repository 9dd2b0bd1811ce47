"""`lifecycle retrain`: the policy's decision recorded, a challenger trained by the stage notebooks on the champion's
data plus labeled production predictions, and compared with the champion on held-out production patients neither model
trained on."""

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from conftest import COLUMNS, HEART, run_lifecycle, stages


def _log_labeled_production(project):
    """Score VA Long Beach and Switzerland with the champion and log them with their labels, over five days, through the
    real log API."""
    from lifecycle.serving.predlog import open_log
    from lifecycle.serving.scoring import Scorer

    names = [name.strip() for name in COLUMNS.split(",")]
    frame = pd.concat(
        [
            pd.read_csv(HEART / f"processed.{name}.data", header=None, names=names, na_values="?")
            for name in ("switzerland", "va")
        ],
        ignore_index=True,
    )
    scorer = Scorer.from_registry(project)
    records = [
        {name: (None if pd.isna(value) else value) for name, value in zip(scorer.spec.features, row)}
        for row in frame[scorer.spec.features].itertuples(index=False, name=None)
    ]
    results, _ = scorer.score_records(records)
    good = [index for index, result in enumerate(results) if result is not None]
    start = datetime.now(timezone.utc)  # the days after the champion's promotion
    with open_log("", project) as log:
        for day in range(5):
            chosen = good[day::5]
            ids = [f"test-{index}" for index in chosen]
            log.record_many(
                ids,
                [results[i]["score"] for i in chosen],
                [results[i]["decision"] for i in chosen],
                pd.DataFrame([records[i] for i in chosen]).astype(float),
                scorer.version,
                channel="online",
                time=start + timedelta(days=day),
            )
            for request_id, index in zip(ids, chosen):
                log.record_label(
                    request_id, int(frame["num"].iloc[index] > 0), time=start + timedelta(days=day, hours=6)
                )
        assert log.flush()
    return {f"test-{index}" for index in good}


# Speed is not what this test is about: the latency gates (evaluate's and deploy's smoke test) are set far out of reach,
# so that a busy machine cannot refuse a model here (the shared champion template refuses one when p99 passes 50 ms).
NO_LATENCY_GATE = ("-p", "evaluate.max_latency_ms=100000", "-p", "deploy.max_latency_ms=100000")


@pytest.fixture
def champion_project(champion_project):
    """The default project after one whole run, without the profile and production traffic: a champion in its registry.
    A copy of the session's template (conftest) with its prediction log, the log's journals and the monitoring built
    from it removed, so that the log holds only what this test logs, as if deploy had replayed no production traffic.
    """
    for path in champion_project.glob("*predictions.sqlite*"):  # the log, its -wal and -shm files, the monitor's lock
        path.unlink()
    shutil.rmtree(champion_project / ".lifecycle" / "journal", ignore_errors=True)
    shutil.rmtree(champion_project / "monitoring")
    assert json.loads((champion_project / "registry" / "aliases.json").read_text())["champion"]
    return champion_project


def test_retrain_decides_trains_a_challenger_through_the_notebooks_and_judges_it_on_unseen_patients(champion_project):
    settings = champion_project / "settings.ini"
    champion = json.loads((champion_project / "registry" / "aliases.json").read_text())["champion"]

    # The default project's rule (100 labeled predictions since the champion's promotion) is not met, and nobody forces
    # it: not now, and the decision is on the record.
    _, result, _, _ = run_lifecycle("retrain", "--settings", settings, "--json", check=0)
    assert result["status"] == "not now" and result["decision"]["retrain"] is False
    assert result["headline"] == "No retrain now: 0 predictions since the champion's promotion have labels (rule: 100)."

    logged = _log_labeled_production(champion_project)
    _, result, _, stderr = run_lifecycle(
        "retrain", "--settings", settings, "--force", "--json", "-p", "prepare.profile=false", *NO_LATENCY_GATE, check=0
    )
    assert result["decision"]["reasons"] == [
        "a person asked for it (--force)",
        f"{len(logged)} predictions since the champion's promotion have labels (rule: 100)",
    ]
    assert result["status"] in ("promoted", "champion kept"), (result["status"], result.get("headline"), stderr[-2000:])
    data = result["data"]
    assert data["labeled"] == len(logged) and data["training_rows"] + data["holdout_rows"] == len(logged)
    assert data["champion_data"]["recoverable"] and data["champion_data"]["clean_rows"] > 0

    # The challenger went through the same stage notebooks, with reports, and is a new registry version.
    run = result["challenger_run"]
    ran = {name: entry["status"] for name, entry in stages(run).items()}
    assert ran["collect"] == ran["prepare"] == ran["train"] == "ran" and ran["retrain"] == "ran", ran
    report = champion_project / "reports" / run["run_id"]
    for name in ("01_collect.html", "02_prepare.html", "03_train.html", "04_evaluate.html", "07_retrain.html"):
        assert (report / name).exists(), name
    challenger = stages(run)["train"]["summary"]["model_version"]
    assert challenger > champion
    version = champion_project / "registry" / "versions" / str(challenger)
    assert (version / "card.html").exists() and (version / "reference.json").exists()
    meta = json.loads((version / "meta.json").read_text())
    production_source = f"production_{result['retrain_id']}"
    assert production_source in meta["sources"] and {"cleveland", "hungarian"} <= set(meta["sources"])
    assert "id_hash" not in meta["features"]["numeric"] + meta["features"]["categorical"]

    # Compared on held-out patients that neither model trained on.
    folder = champion_project / "retrain" / result["retrain_id"]
    held, recent = pd.read_parquet(folder / "holdout.parquet"), pd.read_parquet(folder / "recent.parquet")
    assert not set(held["request_id"]) & set(recent["request_id"])
    assert held["time"].min() >= recent["time"].max()  # the newest are held out
    clean = pd.read_parquet(champion_project / "runs" / run["run_id"] / "prepare" / "clean.parquet")
    assert (clean["_source"] == production_source).sum() <= len(
        recent
    )  # only the training part reached the challenger's data
    champion_sources = json.loads(
        (champion_project / "registry" / "versions" / str(champion) / "meta.json").read_text()
    )["sources"]
    assert not any(source.startswith("production") for source in champion_sources)
    evidence = json.loads((folder / "comparison.json").read_text())
    comparison = evidence["comparison"]
    assert evidence["rows"] == comparison["rows"] > 30 and comparison["rows"] <= len(held)
    assert 0 <= comparison["auc"]["p_value"] <= 1 and comparison["auc"]["auc_a"] > 0.5
    assert {"mid_p_value", "only_a_right", "only_b_right"} <= set(comparison["decisions"])
    assert len(comparison["brier"]["interval"]) == 2 and len(comparison["cost"]["interval"]) == 2
    assert set(comparison["fairness"]) == {"sex", "age"}
    assert comparison["verdict"] in ("better", "parity", "worse")
    assert set(evidence["candidates"]) == {"threshold", "recalibration"}

    # The decision, with its evidence, is on the record; the champion moved only if the rule allowed it.
    summary = stages(run)["retrain"]["summary"]
    assert summary["headline"] and summary["verdict"] == comparison["verdict"]
    recorded = [
        json.loads(line) for line in (champion_project / "retrain" / "decisions.jsonl").read_text().splitlines()
    ]
    assert [entry["kind"] for entry in recorded] == [
        "policy",
        "policy",
        "policy",
        "promotion",
    ]  # the first run's retrain stage recorded one
    assert recorded[-1]["evidence"] == f"retrain/{result['retrain_id']}/comparison.json"
    aliases = json.loads((champion_project / "registry" / "aliases.json").read_text())
    if summary["promoted"] and summary["change"] == "challenger":
        assert (
            aliases["champion"] == challenger and comparison["promote"] and stages(run)["evaluate"]["status"] == "ran"
        )
        event = json.loads((champion_project / "registry" / "events.jsonl").read_text().splitlines()[-1])
        assert "Evidence: retrain/" in event["reason"]
    elif summary["promoted"]:  # the challenger did not win, a cheaper change did: a new version of the champion's model
        assert (
            summary["change"] in ("recalibration", "threshold")
            and evidence["candidates"][summary["change"]]["comparison"]["promote"]
        )
        derived = json.loads(
            (champion_project / "registry" / "versions" / str(summary["promoted_version"]) / "meta.json").read_text()
        )
        assert aliases["champion"] == summary["promoted_version"] and derived["derived_from"]["version"] == champion
        assert recorded[-1]["change"] == summary["change"] and recorded[-1]["version"] == summary["promoted_version"]
    else:
        assert aliases["champion"] == champion and summary["reasons"]

    # The retrain is on the lineage record: the production rows in and the challenger's model out, by content.
    from lifecycle.core import load_settings
    from lifecycle.lineage import check_event, read_events

    retrains = [
        event
        for event in read_events(load_settings(settings))
        if event["job"]["name"] == f"{champion_project.name}.retrain"
        and event["run"]["facets"]["lifecycle"].get("lifecycleRun") == run["run_id"]
    ]
    assert [event["eventType"] for event in retrains] == ["START", "COMPLETE"]
    assert check_event(retrains[1]) == [] and retrains[1]["run"]["facets"]["lifecycle"]["modelVersion"] == challenger
    assert sorted(Path(item["name"]).name for item in retrains[1]["inputs"]) == [
        "holdout.parquet",
        "production.parquet",
        "recent.parquet",
    ]
    assert [item["facets"]["version"]["datasetVersion"] for item in retrains[1]["outputs"]] == [meta["sha256"]]
