"""The example projects of other tasks run from their files through deploy: heart-severity (multiclass, the four
hospitals' grade 0-4) and bike-sharing (regression, hourly rentals). Each is copied with its data, run as a user runs
it (`lifecycle run --settings examples/<name>/settings.ini`, the profile off), and its stages not built for the task
say so in one line. Deploy serves the task's answers: the smoke test, the prediction log (a class's probabilities, the
labels the replay sent back as the task's numbers), the OpenAPI document and /feedback's label type."""

import json
import shutil
import time

import numpy as np
from fastapi.testclient import TestClient

from lifecycle.registry import Registry, load_model
from lifecycle.serving.predlog import open_log, probability_matrix
from lifecycle.serving.serve import create_app

SECRET = "example-labeller-secret-0123456789"  # a labeller's secret for /feedback in these tests


def run_example(name: str, templates) -> tuple[dict, dict, dict]:
    "The whole run of an example: (the run, the evaluate stage's summary, the evaluated version's metadata)."
    folder = templates(name)  # the session's run of the example (conftest `example_templates`), read, never changed
    project = folder / "examples" / name
    run = json.loads((folder / "first-run.json").read_text())
    stages = {stage["name"]: stage for stage in run["stages"]}
    assert [stages[name]["status"] for name in ("collect", "prepare", "train", "evaluate", "deploy")] == ["ran"] * 5, (
        run
    )
    deployed = stages["deploy"]["summary"]
    assert deployed["champion"] and deployed["smoke"]["failed"] == 0, deployed  # served = the pipeline's answers
    assert deployed["smoke"]["max_abs_diff"] <= 1e-12 and deployed["production"]["scored"] > 100, deployed
    for name in ("monitor", "retrain"):  # one honest line each, nothing run
        assert stages[name]["status"] == "not built", stages[name]
        assert stages[name]["error"].startswith("not built for a "), stages[name]["error"]
    evaluated = stages["evaluate"]["summary"]
    registry = Registry(project)
    meta = registry.meta(evaluated["model_version"])
    load_model(registry, evaluated["model_version"])  # the registry loads the task's model back
    report = (project / "reports" / run["run_id"] / "04_evaluate.html").read_text()
    return run, evaluated, {**meta, "report": report, "project": project}


def served(template_project, tmp_path) -> tuple[dict, dict, list]:
    """The example's champion served in-process from a copy of the session's template (which no test changes): (the
    OpenAPI document's schemas, one answer to a logged record's features, the log's predictions and labels after
    /feedback refused a label of the wrong type)."""
    copy = tmp_path / "example"
    shutil.copytree(template_project.parent.parent, copy, symlinks=True)
    project = copy / "examples" / template_project.name
    log = open_log("", project)
    try:
        logged = log.predictions()
        registry = Registry(project)
        features = registry.meta(registry.resolve("champion"))["features"]
        record = {name: _json(logged[name].iloc[0]) for name in features["numeric"] + features["categorical"]}
        with TestClient(create_app(project, prediction_log=log, labellers={"lab": SECRET}, shadow=False)) as client:
            for _ in range(600):  # the model loads on the app's own thread: up to a minute on a busy machine
                if client.get("/ready").status_code == 200:
                    break
                time.sleep(0.1)
            schemas = client.get("/openapi.json").json()["components"]["schemas"]
            answer = client.post("/predict", json=record).json()["predictions"][0]
            refused = client.post(
                "/feedback",
                json={"request_id": answer["request_id"], "label": "no such label"},
                headers={"Authorization": f"Bearer {SECRET}"},
            )
            assert refused.status_code == 422, refused.text
        log.flush(30)
        return schemas, {**answer, "refused": refused.json()["detail"][0]["msg"]}, [log.predictions(), log.labels()]
    finally:
        log.close()


def _json(value):  # a logged feature as a JSON value
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else value


def test_heart_severity_grades_are_trained_and_judged_as_classes(example_templates, tmp_path):
    run, evaluated, meta = run_example("heart-severity", example_templates)
    assert meta["task"] == "multiclass" and meta["decision"]["task"] == "multiclass"
    assert evaluated["headline"].startswith(f"Model version {evaluated['model_version']} passed the gate: balanced")
    assert 0.3 < evaluated["metrics"]["balanced_accuracy"] < 0.8 and evaluated["metrics"]["roc_auc"] > 0.75
    assert evaluated["fairness"]["sex"]["balanced_accuracy_difference"] is not None
    assert "Grade 4 is too rare" in meta["report"]  # Hungary has no grade 4, Cleveland 13: named, not judged
    assert meta["classes"] == ["0", "1", "2", "3", "4"]  # the class order of answers, the log and feedback
    schemas, answer, (predictions, labels) = served(meta["project"], tmp_path)
    assert schemas["Prediction"]["required"] == [
        "request_id",
        "label",
        "probabilities",
        "score",
        "decision",
        "model_version",
    ]
    assert schemas["Feedback"]["properties"]["label"]["enum"][:5] == [0, 1, 2, 3, 4]
    assert list(answer["probabilities"]) == ["0", "1", "2", "3", "4"] and answer["label"] == answer["decision"]
    assert abs(sum(answer["probabilities"].values()) - 1) < 1e-9 and answer["score"] == max(
        answer["probabilities"].values()
    )
    assert answer["refused"] == "expected one of the classes: 0, 1, 2, 3, 4"
    matrix = probability_matrix(predictions)  # every prediction logged with its class probabilities
    assert matrix.shape == (len(predictions), 5) and np.allclose(matrix.sum(axis=1), 1)
    assert (predictions["decision"].to_numpy() == matrix.argmax(axis=1)).all()
    assert len(labels) > 20 and labels["label"].dtype == np.int64 and set(labels["label"]) <= set(range(5))


def test_bike_sharing_rentals_are_predicted_with_an_interval(example_templates, tmp_path):
    run, evaluated, meta = run_example("bike-sharing", example_templates)
    assert meta["task"] == "regression" and meta["decision"]["target"] == 0.9
    assert meta["decision"]["fitted_on_rows"] > 1000  # calibrated on the validation split, rows the model never saw
    assert 0.8 < evaluated["metrics"]["coverage"] < 0.97, evaluated["metrics"]  # near 90% on the test weeks
    assert evaluated["metrics"]["r2"] > 0.5 and "MAE" in evaluated["headline"]
    assert evaluated["fairness"]["weathersit"]["relative_mae_difference"] is not None
    assert "ROC AUC" not in meta["report"] and "too few patients" not in meta["report"]  # the task's words
    assert json.dumps(evaluated).count("roc_auc") == 0
    schemas, answer, (predictions, labels) = served(meta["project"], tmp_path)
    assert schemas["Prediction"]["required"][1:5] == ["value", "low", "high", "coverage"]
    assert schemas["Feedback"]["properties"]["label"]["type"] == "number"
    half = meta["threshold"]
    assert (
        answer["low"] == answer["value"] - half
        and answer["high"] == answer["value"] + half
        and answer["coverage"] == 0.9
    )
    assert (answer["score"], answer["decision"], answer["refused"]) == (answer["value"], 0, "expected a finite number")
    assert predictions["probabilities"].isna().all() and (predictions["decision"] == 0).all()
    assert len(labels) > 100 and labels["label"].min() >= 0  # hourly rentals sent back as numbers
