"""A challenger in shadow beside the champion: a real server, batch and stream answer as without it, the shadow's
predictions are logged and paired, a failing shadow changes nothing, and promotion waits for `[retrain] shadow_min`."""

import json
import time
from pathlib import Path
from unittest import mock

import httpx
import numpy as np
import pandas as pd
from conftest import FEATURES, LABELLER, run_lifecycle
from test_serve import Server, records_of


def register_challenger(project: Path) -> int:
    "Another model of the champion's kind, trained on the same rows with other settings: its scores differ."
    from sklearn.base import clone

    from lifecycle.registry import Registry, load_model, register

    registry = Registry(project)
    champion = registry.resolve("champion")
    model = load_model(registry, champion)
    run = json.loads((project / "first-run.json").read_text())
    clean = pd.read_parquet(project / "runs" / run["run_id"] / "prepare" / "clean.parquet")
    train = clean[clean["_split"] == "train"]
    challenger = (
        clone(model).set_params(model__max_iter=15, model__learning_rate=0.3).fit(train[FEATURES], train["_label"])
    )
    meta = {k: v for k, v in registry.meta(champion).items() if k not in ("version", "sha256", "bytes", "created")}
    return register(registry, challenger, meta)


def wait_for(check, seconds=60, what="the condition"):
    deadline = time.time() + seconds
    while not check():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def pairs_of(project: Path) -> pd.DataFrame:
    from lifecycle.serving.predlog import open_log, shadow_pairs

    with open_log("", project) as log:
        return shadow_pairs(log)


def answers(url: str, records: list) -> list[dict]:
    "One request per record (as clients send them), answered in order."
    out = []
    for record in records:
        reply = httpx.post(url + "/predict", json=record, timeout=30)
        assert reply.status_code == 200, reply.text
        out.append(reply.json())
    return out


def test_server_with_a_shadow(champion_project):
    from lifecycle.loop import retrain_project
    from lifecycle.registry import Registry, load_model, register, set_alias
    from lifecycle.serving.scoring import Scorer

    project = champion_project
    registry = Registry(project)
    champion = registry.resolve("champion")
    challenger = register_challenger(project)
    records, _ = records_of(project)
    records = records[:60]
    server = Server(project)
    try:
        before = answers(server.url, records)
        assert httpx.get(server.url + "/model").json()["shadow"]["version"] is None
        set_alias(registry, "shadow", challenger, "test: in shadow")
        wait_for(
            lambda: httpx.get(server.url + "/model").json()["shadow"]["version"] == challenger,
            what="the shadow to load",
        )
        with_shadow = answers(server.url, records)

        # the answers are the champion's, identical to those without a shadow
        def strip(replies):
            return [(r["model_version"], [(p["score"], p["decision"]) for p in r["predictions"]]) for r in replies]

        assert strip(with_shadow) == strip(before)
        assert {r["model_version"] for r in with_shadow} == {champion}
        # every record of those requests has a shadow prediction, logged and paired with the champion's
        request_ids = [r["predictions"][0]["request_id"] for r in with_shadow]
        wait_for(
            lambda: set(request_ids) <= set(pairs_of(project)["request_id"]), what="the shadow's predictions in the log"
        )
        pairs = pairs_of(project).set_index("request_id").loc[request_ids]
        expected = Scorer.from_registry(project, challenger).score_records(records)[0]
        assert pairs["shadow_score"].tolist() == [p["score"] for p in expected]
        assert pairs["champion_score"].tolist() == [r["predictions"][0]["score"] for r in with_shadow]
        assert set(pairs["shadow_version"]) == {challenger} and set(pairs["champion_version"]) == {champion}
        assert set(pairs["channel"]) == {"online"} and pairs["label"].isna().all()
        assert (pairs["shadow_score"] != pairs["champion_score"]).any()  # a real challenger, not the champion again
        # a label sent for the champion's request id is the label of the pair
        assert (
            httpx.post(
                server.url + "/feedback", json={"request_id": request_ids[0], "label": 1}, headers=LABELLER
            ).status_code
            == 202
        )
        wait_for(
            lambda: (
                pd.notna(label := pairs_of(project).set_index("request_id").loc[request_ids[0], "label"]) and label == 1
            ),
            what="the label",
        )
        # the champion's monitoring figures leave the shadow out
        from lifecycle.core import open_project
        from lifecycle.monitoring import monitor_project

        monitor_project(open_project(project / "settings.ini"))
        windows = pd.read_parquet(project / "monitoring" / "windows.parquet")
        assert champion in set(windows["model_version"]) and challenger not in set(windows["model_version"])

        # promotion waits for [retrain] shadow_min: 100 shadow predictions asked, 60 made
        result = retrain_project(project / "settings.ini", overrides=["retrain.shadow_min=100"], quiet=True)
        assert result["status"] == "in shadow", result
        assert "has 60 shadow predictions; [retrain] shadow_min asks for 100" in result["headline"]
        assert (registry.aliases()["champion"], registry.aliases()["shadow"]) == (champion, challenger)
        answers(server.url, records[:40])
        wait_for(lambda: len(pairs_of(project)) >= 100, what="100 shadow predictions")
        result = retrain_project(project / "settings.ini", overrides=["retrain.shadow_min=100"], quiet=True)
        assert result["status"] == "promoted", result
        assert (registry.aliases()["champion"], registry.aliases().get("shadow")) == (challenger, None)
        wait_for(lambda: httpx.get(server.url + "/model").json()["version"] == challenger, what="the hot swap")
        # the shadow watches the aliases on its own thread: it lets go of the promoted version a moment later (until
        # then it skips what the same version scored as champion)
        wait_for(lambda: httpx.get(server.url + "/model").json()["shadow"]["version"] is None, what="the shadow to go")

        # a shadow that fails (its model file changed after it was set) changes no answer, and logs nothing
        broken = register(
            registry,
            load_model(registry, champion),
            {k: v for k, v in registry.meta(champion).items() if k not in ("version", "sha256", "bytes", "created")},
        )
        (registry.path / "versions" / str(broken) / "model.skops").write_bytes(b"not a model")
        with mock.patch(
            "lifecycle.registry.load_model"
        ):  # set_alias would refuse the file; here it changed after the check
            set_alias(registry, "shadow", broken, "test: a failing shadow")
        wait_for(
            lambda: "failed to load" in (httpx.get(server.url + "/model").json()["shadow"]["error"] or ""),
            what="the shadow's failure",
        )
        logged_before = len(pairs_of(project))
        plain = answers(server.url, records[:20])
        expected = Scorer.from_registry(project, challenger).score_records(records[:20])[0]
        assert [r["predictions"][0]["score"] for r in plain] == [p["score"] for p in expected]
        assert {r["model_version"] for r in plain} == {challenger}
        metrics = httpx.get(server.url + "/metrics").text
        assert "lifecycle_shadow_version 0.0" in metrics
    finally:
        server.stop()
    assert (
        len(pairs_of(project)) == logged_before
    )  # the server drained and closed its log: nothing more from the broken shadow
    assert "Traceback" not in server.output.read_text()


def test_batch_and_stream_with_a_shadow(champion_project, tmp_path):
    from lifecycle.registry import Registry
    from lifecycle.serving.batch import score_file
    from lifecycle.serving.scoring import Scorer
    from lifecycle.serving.stream import run_stream

    project = champion_project
    registry = Registry(project)
    champion, challenger = registry.resolve("champion"), register_challenger(project)
    records, rows = records_of(project)
    source = tmp_path / "in.csv"
    rows[FEATURES].to_csv(source, index=False)
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(record) + "\n" for record in records))

    plain_batch = score_file(project, source, tmp_path / "plain.parquet", progress=False)
    plain_stream = run_stream(project, str(events), str(tmp_path / "plain.jsonl"), handle_signals=False)
    assert plain_batch["shadow"] is None and plain_stream["shadow"] is None and not len(pairs_of(project))
    code, listing, _, _ = run_lifecycle(
        "models",
        "shadow",
        str(challenger),
        "--reason",
        "test: in shadow",
        "--settings",
        project / "settings.ini",
        "--json",
    )
    assert (code, listing["aliases"]["shadow"], listing["event"]["alias"]) == (0, challenger, "shadow")
    batch = score_file(project, source, tmp_path / "shadowed.parquet", progress=False)
    stream = run_stream(project, str(events), str(tmp_path / "shadowed.jsonl"), handle_signals=False)
    # the outputs are the champion's, as without a shadow
    assert pd.read_parquet(tmp_path / "plain.parquet").equals(pd.read_parquet(tmp_path / "shadowed.parquet"))

    def strip(path):
        return [
            {k: v for k, v in json.loads(line).items() if k != "request_id"} for line in path.read_text().splitlines()
        ]

    assert strip(tmp_path / "plain.jsonl") == strip(tmp_path / "shadowed.jsonl")
    assert {r["model_version"] for r in strip(tmp_path / "shadowed.jsonl")} == {champion}
    # every row of both has its shadow prediction, paired with the champion's
    assert batch["shadow"]["scored"] == batch["rows_scored"] == len(rows) and batch["shadow"]["failed"] == 0
    assert stream["shadow"]["scored"] == stream["scored"] == len(records) and stream["shadow"]["failed"] == 0
    pairs = pairs_of(project)
    expected = np.array([p["score"] for p in Scorer.from_registry(project, challenger).score_records(records)[0]])
    for channel in ("batch", "stream"):
        mine = pairs[pairs["channel"] == channel]
        assert len(mine) == len(records) and set(mine["shadow_version"]) == {challenger}
        assert np.allclose(np.sort(mine["shadow_score"].to_numpy()), np.sort(expected), rtol=0, atol=1e-12)
    # the Dask engine too: its workers load the shadow beside the champion (another file: other request ids)
    rows[FEATURES].iloc[:40].to_csv(tmp_path / "part.csv", index=False)
    dask = score_file(project, tmp_path / "part.csv", tmp_path / "dask-out.parquet", engine="dask", progress=False)
    assert (
        dask["shadow"]["scored"] == dask["rows_scored"] == 40
        and dask["shadow"]["failed"] == 0
        and dask["shadow"]["version"] == challenger
    )
    batch_pairs = pairs_of(project)
    batch_pairs = batch_pairs[batch_pairs["channel"] == "batch"]
    assert len(batch_pairs) == len(records) + 40 and set(batch_pairs["shadow_version"]) == {challenger}
    assert np.allclose(
        np.sort(batch_pairs["shadow_score"].to_numpy()),
        np.sort(np.concatenate([expected, expected[:40]])),
        rtol=0,
        atol=1e-12,
    )
    code, listing, _, _ = run_lifecycle(
        "models", "shadow", "--clear", "--reason", "test: done", "--settings", project / "settings.ini", "--json"
    )
    assert (code, "shadow" in listing["aliases"], listing["event"]["previous"]) == (0, False, challenger)
    assert (registry.aliases()["champion"], registry.aliases().get("shadow")) == (champion, None)
