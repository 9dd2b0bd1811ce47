"""Promotion and its record are one step: a process killed (SIGKILL) at any point of the write leaves aliases and events
that agree."""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd

from lifecycle.registry import Registry, events, register, set_alias
from lifecycle.train import build_pipeline

# The child promotes version 2 and kills itself with SIGKILL just before (or just after) its k-th file-system
# step: each rename that makes a write visible, and each removal. Every point of the write is hit in turn.
# Both children count their file-system steps from here on and kill themselves at step k (argv[2], before or after).
DEADLY = textwrap.dedent("""
    steps = [0]
    def deadly(function):
        def step(*args, **kwargs):
            steps[0] += 1
            if steps[0] == k and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = function(*args, **kwargs)
            if steps[0] == k and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return step
    os.replace, os.rename, os.unlink = deadly(os.replace), deadly(os.rename), deadly(os.unlink)
""")

CHILD = (
    textwrap.dedent("""
    import os, signal, sys
    from lifecycle.registry import Registry, set_alias
    root, k, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
""")
    + DEADLY
    + textwrap.dedent("""
    set_alias(Registry(root), "champion", 2, "kill test")
    print(steps[0])
""")
)


def _template(root):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"age": rng.uniform(20, 80, 100), "chol": rng.uniform(100, 400, 100)})
    labels = (frame["age"] > 50).astype(int)
    registry = Registry(root)
    for seed in (0, 1):
        register(
            registry,
            build_pipeline("logistic_regression", ["age", "chol"], [], seed).fit(frame, labels),
            {"metrics": {}},
        )
    set_alias(registry, "champion", 1, "first")


def test_a_kill_at_every_point_of_a_promotion_leaves_aliases_and_events_in_agreement(tmp_path):
    template = tmp_path / "template"
    _template(template)
    kills, outcomes = 0, set()
    for when in ("before", "after"):
        for k in range(1, 50):
            project = tmp_path / f"{when}-{k}"
            shutil.copytree(template, project)
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(project), str(k), when], capture_output=True, text=True, timeout=300
            )
            if done.returncode == 0:
                assert k > int(done.stdout.split()[-1]), "the child finished without reaching its kill point"
                break
            assert done.returncode == -signal.SIGKILL, done.stderr
            kills += 1
            registry = Registry(project)  # the next process to open the registry
            champion, history = registry.aliases()["champion"], events(registry)
            assert [event["version"] for event in history] == ([1] if champion == 1 else [1, 2]), (
                when,
                k,
                champion,
                history,
            )
            assert history[-1]["version"] == champion
            assert not (registry.path / "alias-change.json").exists()
            outcomes.add(champion)
        else:
            raise AssertionError("the promotion never completed")
    # both outcomes occur: a kill before the change is recorded changes nothing, one after it completes it
    assert kills >= 6 and outcomes == {1, 2}, (kills, outcomes)
    print(f"kills during promotion: {kills}, records missing: 0")


# The retrain's promotion path: a winning recalibration is registered as a new version (the champion's model file, its
# map and threshold in the metadata, its card) and promoted with compare-and-set, then the decision is recorded. The
# child runs that step (`retrain.conclude`, as the retrain stage calls it) and kills itself just before or after its
# k-th file-system step.
CONCLUDE = (
    textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    root, k, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    from lifecycle.challenger import conclude
    judged = json.loads((Path(root) / "retrain" / "t1" / "comparison.json").read_text())
""")
    + DEADLY
    + textwrap.dedent("""
    refused = {"passed": False, "reasons": ["refused"]}
    outcome = conclude(Path(root), "t1", judged, refused, {}, "retrain/t1/comparison.json")
    print(json.dumps({"steps": steps[0], "version": outcome.get("version"), "change": outcome.get("change")}))
""")
)


def _recalibration_template(root):
    """A tiny project whose champion ranks production well but scores it far too low: recalibrating it wins on the
    held-out patients."""
    from datetime import datetime, timedelta, timezone

    from lifecycle.challenger import judge
    from lifecycle.core import load_settings, write_json
    from lifecycle.retrain import write_retraining_data

    rng = np.random.default_rng(1)

    def patients(count):
        return pd.DataFrame(
            {
                "age": rng.uniform(20, 80, count).round(),
                "chol": rng.uniform(100, 400, count).round(),
                "sex": rng.integers(0, 2, count).astype(float),
            }
        )

    def rule(frame):
        return (frame["age"] + 30 * frame["sex"] > 65).astype(int)

    old, new = patients(300), patients(200)
    meta = {
        "features": {"numeric": ["age", "chol"], "categorical": ["sex"]},
        "threshold": 0.5,
        "data_version": "d1",
        "schema": {
            "columns": {
                "age": {"kind": "numeric", "min": 1.0, "max": 120.0},
                "chol": {"kind": "numeric", "min": 80.0, "max": 700.0},
                "sex": {"kind": "category", "type": "number", "categories": [0.0, 1.0]},
            }
        },
        "settings": {"prepare": {"recode": "", "missing_values": ""}, "data": {"id": "", "sources": "a: a.csv"}},
    }
    root.mkdir(parents=True)
    (root / "settings.ini").write_text(
        "[data]\nsources = a: a.csv\ncolumns = age, chol, sex, num\n"
        "target = num\npositive = 1\nnegative = 0\nsensitive = sex\n"
        "[evaluate]\nmax_fairness_gap = 0.9\n"
    )
    registry = Registry(root)
    champion = register(
        registry, build_pipeline("hist_gradient_boosting", ["age", "chol"], ["sex"]).fit(old, rule(old)), meta
    )
    set_alias(registry, "champion", champion, "first")
    now = datetime(2026, 3, 1, tzinfo=timezone.utc)
    sick = ((rule(new) == 1) | (np.random.default_rng(5).random(200) < 0.6)).astype(int)
    labeled = new.assign(
        request_id=[f"r{i}" for i in range(200)], time=[now + timedelta(hours=i) for i in range(200)], label=sick
    )
    write_retraining_data(load_settings(root / "settings.ini"), {"holdout_share": 0.5}, labeled, now, "t1")
    judged = judge(load_settings(root / "settings.ini"), "t1", champion, {"min_compare_rows": 30, "bootstrap": 200})
    assert judged["candidates"]["recalibration"]["comparison"]["promote"], judged["candidates"]["recalibration"][
        "comparison"
    ]["headline"]
    write_json(root / "retrain" / "t1" / "comparison.json", judged)
    return champion


def test_a_kill_at_every_point_of_a_retrain_promotion_leaves_the_old_or_the_new_champion_hash_valid(tmp_path):
    from lifecycle.registry import load_model
    from lifecycle.serving.scoring import Scorer

    template = tmp_path / "template"
    champion = _recalibration_template(template)
    kills, outcomes, completed = 0, set(), False
    # before the first step, then just after each step (between two steps only files nobody reads yet are written)
    for when, k in [("before", 1)] + [("after", step) for step in range(1, 60)]:
        project = tmp_path / f"{when}-{k}"
        shutil.copytree(template, project)
        done = subprocess.run(
            [sys.executable, "-c", CONCLUDE, str(project), str(k), when], capture_output=True, text=True, timeout=300
        )
        if done.returncode == 0:
            finished = json.loads(done.stdout.strip().splitlines()[-1])
            assert k > finished["steps"] and finished["change"] in ("recalibration", "threshold"), (k, finished)
            completed = True
            break
        assert done.returncode == -signal.SIGKILL, done.stderr
        kills += 1
        registry = Registry(project)  # the next process to open the registry
        now = registry.aliases()["champion"]
        history = [event["version"] for event in events(registry) if event["alias"] == "champion"]
        assert history == ([champion] if now == champion else [champion, now]), (when, k, now, history)
        assert not (registry.path / "alias-change.json").exists()
        for (
            version
        ) in registry.versions():  # every version the registry shows is whole: its file matches its hash and loads
            load_model(registry, version)
        if now != champion:  # the new champion is the derived version, whole: the champion's model, its map, its card
            meta = registry.meta(now)
            assert meta["derived_from"]["version"] == champion and meta["sha256"] == registry.meta(champion)["sha256"]
            assert (registry.path / "versions" / str(now) / "card.html").exists()
            assert Scorer.from_registry(project).version == now
        outcomes.add("old" if now == champion else "new")
    # both outcomes occur: a kill before the alias change is recorded leaves the old champion, one after it the new
    assert completed and kills >= 6 and outcomes == {"old", "new"}, (kills, outcomes)
    print(f"kills during a retrain's promotion: {kills}, registries left mixed: 0")


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lifecycle.retrain import retrain_lock
    with retrain_lock(Path(sys.argv[1])) as held:
        print("held" if held else "busy", flush=True)
        time.sleep(600)
""")


def test_a_retrain_killed_while_holding_the_lock_does_not_leave_it_stuck(tmp_path):
    from lifecycle.retrain import retrain_lock

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with retrain_lock(tmp_path) as held:
            assert held is False  # a live holder keeps it
    finally:
        holder.kill()  # SIGKILL: no clean-up runs
        holder.wait()
    with retrain_lock(tmp_path) as held:
        assert held is True  # the kernel released a dead holder's lock


def test_two_retrains_started_together_end_with_at_most_one_promotion(champion_project):
    """Two `lifecycle retrain` processes on one project: the second starts while the first holds the retrain lock, says
    so in one line, records it."""
    from conftest import LIFECYCLE

    from lifecycle.promotion import decisions

    registry = Registry(champion_project)
    champion, events_before = registry.aliases()["champion"], len(events(registry))
    # a lean challenger (fewer folds, seeds and resamples), its production rows weighing 3 times a row of the champion's
    # data
    lean = [
        "-p",
        "prepare.profile=false",
        "-p",
        "train.cv_folds=3",
        "-p",
        "evaluate.fairness_seeds=1",
        "-p",
        "evaluate.bootstrap_resamples=100",
        "-p",
        "retrain.bootstrap=200",
        "-p",
        "retrain.production_weight=3",
    ]
    command = [str(LIFECYCLE), "retrain", "--settings", str(champion_project / "settings.ini"), "--force", *lean]
    first = subprocess.Popen(command + ["--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the first holds the lock once it writes its retraining data (under the lock): no timing, a state to wait for
        while not list((champion_project / "retrain").glob("*/data.json")):
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = subprocess.run(command, capture_output=True, text=True, timeout=600)
        out, err = first.communicate(timeout=1200)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip().splitlines() == [
        "No retrain: another retrain of this project is running (retrain/.lock)."
    ]
    assert first.returncode == 0, err[-3000:]
    result = json.loads(out)
    assert result["status"] in ("promoted", "champion kept"), (result["status"], result.get("headline"))
    moved = [event for event in events(registry)[events_before:] if event["alias"] == "champion"]
    assert len(moved) == (1 if result["status"] == "promoted" else 0), moved
    assert registry.aliases()["champion"] == (moved[0]["version"] if moved else champion)
    recorded = decisions(champion_project)
    assert [entry["kind"] for entry in recorded].count("busy") == 1
    assert [entry["kind"] for entry in recorded].count("promotion") == 1
    # the weight reached the challenger's fit, on the record
    trained = json.loads((registry.path / "versions" / str(result["summary"]["challenger"]) / "meta.json").read_text())
    assert (
        trained["source_weights"] == f"production_{result['retrain_id']}: 3"
        and result["data"]["production_weight"] == 3
    )


def test_a_promoted_recalibration_is_served_online_in_batch_and_in_streams_with_the_scores_the_comparison_judged(
    tmp_path,
):
    """The derived version (the champion's model file, its map and threshold in the metadata) through serve, batch and
    stream: the judged scores, bit for bit."""
    from fastapi.testclient import TestClient

    from lifecycle.challenger import register_change
    from lifecycle.serving.batch import score_file
    from lifecycle.serving.serve import create_app
    from lifecycle.serving.stream import run_stream

    root = tmp_path / "project"
    champion = _recalibration_template(root)
    judged = json.loads((root / "retrain" / "t1" / "comparison.json").read_text())
    version = register_change(root, judged, "recalibration", "t1", "retrain/t1/comparison.json")
    set_alias(Registry(root), "champion", version, "the recalibration won", expected=champion)
    scored = pd.read_parquet(root / "retrain" / "t1" / "scores.parquet")
    held = (
        pd.read_parquet(root / "retrain" / "t1" / "holdout.parquet").set_index("request_id").loc[scored["request_id"]]
    )
    features = ["age", "chol", "sex"]
    records = [
        {name: (None if pd.isna(value) else float(value)) for name, value in zip(features, row)}
        for row in held[features].itertuples(index=False)
    ]
    judged_scores = scored["recalibration"].to_numpy()
    judged_decisions = (judged_scores >= judged["candidates"]["recalibration"]["threshold"]).astype(int).tolist()
    assert not np.array_equal(
        judged_scores, scored["champion"].to_numpy()
    )  # the map moves the scores: this test can tell

    with TestClient(create_app(root)) as client:  # online: one record a request
        while client.get("/ready").status_code != 200:  # the server loads its model in the background
            time.sleep(0.05)
        online = [client.post("/predict", json=record).json()["predictions"][0] for record in records]
    assert {answer["model_version"] for answer in online} == {version}
    assert np.array_equal([answer["score"] for answer in online], judged_scores)
    assert [answer["decision"] for answer in online] == judged_decisions

    held[features].reset_index(drop=True).to_parquet(tmp_path / "in.parquet")
    score_file(root, tmp_path / "in.parquet", tmp_path / "out.parquet", log=False, progress=False)
    batch = pd.read_parquet(tmp_path / "out.parquet")
    assert np.array_equal(batch["score"].to_numpy(), judged_scores) and batch["decision"].tolist() == judged_decisions

    (tmp_path / "in.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    run_stream(
        root, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), log_predictions=False, handle_signals=False
    )
    streamed = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert (
        np.array_equal([event["score"] for event in streamed], judged_scores)
        and [event["decision"] for event in streamed] == judged_decisions
    )
