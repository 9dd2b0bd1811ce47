"""Lineage in the open standard and model cards in the common formats, on the shared trained project: every stage's
OpenLineage events validate and name what they read and wrote by content; a batch run adds its own; a served
prediction's request id leads back to the source lines its model was fitted on; the card exists as Model Card Toolkit
JSON and as a Hugging Face card, each conforming to its schema."""

import json
from pathlib import Path

import pandas as pd
from conftest import FEATURES, run_lifecycle

from lifecycle.card_formats import check_hf, check_mct
from lifecycle.core import load_settings, open_project
from lifecycle.files import sha256_file
from lifecycle.lineage import check_event, read_events


def _completed(events, job):
    return [event for event in events if event["job"]["name"] == job and event["eventType"] == "COMPLETE"]


def test_every_stage_run_emits_events_that_validate_and_name_its_data_by_content(champion_project):
    settings = load_settings(champion_project / "settings.ini")
    events = read_events(settings)
    assert events, "the template's run wrote no lineage events"
    assert [line for event in events for line in check_event(event)] == []
    project = champion_project.name
    for stage in ("collect", "prepare", "train", "evaluate", "deploy", "monitor", "retrain", "run"):
        started = [e for e in events if e["job"]["name"] == f"{project}.{stage}" and e["eventType"] == "START"]
        completed = _completed(events, f"{project}.{stage}")
        assert len(started) == len(completed) == 1, stage
        assert started[0]["run"]["runId"] == completed[0]["run"]["runId"]
    pipeline = _completed(events, f"{project}.run")[0]["run"]["runId"]
    train = _completed(events, f"{project}.train")[0]
    assert train["run"]["facets"]["parent"]["run"]["runId"] == pipeline
    # the collect stage read the sources, each named with its SHA-256 as it is on disk
    collected = _completed(events, f"{project}.collect")[0]
    sources = {Path(item["name"]).name: item["facets"]["version"]["datasetVersion"] for item in collected["inputs"]}
    assert set(sources) == {"processed.cleveland.data", "processed.hungarian.data"}
    for name, digest in sources.items():
        assert digest == sha256_file(champion_project / "data" / "heart-disease-uci" / name)
    # train wrote the model version, by the hash the registry holds
    facet = train["run"]["facets"]["lifecycle"]
    meta = json.loads(
        (champion_project / "registry" / "versions" / str(facet["modelVersion"]) / "meta.json").read_text()
    )
    assert facet["modelSha256"] == meta["sha256"]
    model = [item for item in train["outputs"] if item["name"].endswith("model.skops")]
    assert model and model[0]["facets"]["version"]["datasetVersion"] == meta["sha256"]
    assert facet["codeCommit"] == meta["code_commit"]  # the git commit of the code that ran


def test_a_batch_run_emits_its_input_model_and_output(champion_project, tmp_path):
    rows = pd.read_csv(
        champion_project / "data" / "heart-disease-uci" / "processed.cleveland.data",
        header=None,
        names=FEATURES + ["num"],
        na_values="?",
    ).head(20)
    rows[FEATURES].to_csv(tmp_path / "visits.csv", index=False)
    run_lifecycle(
        "batch",
        "--settings",
        champion_project / "settings.ini",
        "--input",
        tmp_path / "visits.csv",
        "--output",
        tmp_path / "scored.csv",
        "--no-log",
        "--json",
        check=0,
    )
    events = read_events(load_settings(champion_project / "settings.ini"))
    batch = _completed(events, f"{champion_project.name}.batch")
    assert len(batch) == 1 and check_event(batch[0]) == []
    assert [item["facets"]["version"]["datasetVersion"] for item in batch[0]["inputs"]] == [
        sha256_file(tmp_path / "visits.csv")
    ]
    assert sha256_file(tmp_path / "scored.csv") in [
        item["facets"]["version"]["datasetVersion"] for item in batch[0]["outputs"]
    ]
    assert batch[0]["run"]["facets"]["lifecycle"]["modelVersion"] == 1


def test_a_request_id_traces_back_to_the_source_lines_its_model_was_fitted_on(champion_project, capsys):
    from lifecycle.audit_trace import add_trace_parser, trace
    from lifecycle.serving.predlog import open_log

    project = open_project(champion_project / "settings.ini")
    with open_log(project.log_url, project.root) as log:
        prediction = log.predictions(limit=1, channel="online", features=True).iloc[0]
    found = trace(project, prediction["request_id"])
    meta = json.loads(
        (champion_project / "registry" / "versions" / str(found["model"]["version"]) / "meta.json").read_text()
    )
    assert found["model"]["intact"] and found["prediction"]["model_version"] == prediction["model_version"]
    assert sum(item["rows"] for item in found["lines"]) == meta["rows"]["train"]
    assert {item["source"] for item in found["lines"]} == {"cleveland", "hungarian"}
    assert [source["state"] for source in found["manifest"]["sources"]] == ["unchanged", "unchanged"]
    events = read_events(project.settings)
    assert found["lineage_run"] == _completed(events, f"{champion_project.name}.train")[0]["run"]["runId"]

    # the command's words: no feature of the record; a source edited since says so
    with open(champion_project / "data" / "heart-disease-uci" / "processed.hungarian.data", "a") as source:
        source.write("\n")
    import argparse

    actions = argparse.ArgumentParser().add_subparsers()
    add_trace_parser(actions)
    args = actions.choices["trace"].parse_args(
        [prediction["request_id"], "--settings", str(champion_project / "settings.ini")]
    )
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert (
        "hungarian: data/heart-disease-uci/processed.hungarian.data, SHA-256" in printed and "changed since" in printed
    )
    for item in found["lines"]:
        assert f"{item['source']}: {item['file']}, lines {item['lines']}" in printed
    for feature in FEATURES:  # the record's values are never printed (its id, pseudonym: nbs/11f_audit_trace checks)
        assert f"{feature}: " not in printed and f"{feature}=" not in printed and f'"{feature}"' not in printed
    assert '"features"' not in json.dumps(found)


def test_the_card_is_also_model_card_toolkit_json_and_a_hugging_face_card(champion_project):
    version = champion_project / "registry" / "versions" / "1"
    toolkit = json.loads((version / "model_card.json").read_text())
    hub = (version / "README.md").read_text()
    assert check_mct(toolkit) == [] and check_hf(hub) == []
    meta = json.loads((version / "meta.json").read_text())
    assert toolkit["model_details"]["version"]["diff"] == f"SHA-256 {meta['sha256']}"
    roc = [item for item in toolkit["quantitative_analysis"]["performance_metrics"] if item["type"] == "roc_auc"][0]
    assert float(roc["value"]) == round(meta["evaluation"]["metrics"]["roc_auc"], 4)
    assert hub.split("---\n", 2)[2].strip() == (version / "card.md").read_text().strip()
