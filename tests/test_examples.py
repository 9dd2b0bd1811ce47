"""The example projects of other tasks run from their files through the gate: heart-severity (multiclass, the four
hospitals' grade 0-4) and bike-sharing (regression, hourly rentals). Each is copied with its data, run as a user runs
it (`lifecycle run --settings examples/<name>/settings.ini`, the profile off), and its stages not built for the task
say so in one line."""

import json

from lifecycle.registry import Registry, load_model


def run_example(name: str, templates) -> tuple[dict, dict, dict]:
    "The whole run of an example: (the run, the evaluate stage's summary, the evaluated version's metadata)."
    folder = templates(name)  # the session's run of the example (conftest `example_templates`), read, never changed
    project = folder / "examples" / name
    run = json.loads((folder / "first-run.json").read_text())
    stages = {stage["name"]: stage for stage in run["stages"]}
    assert [stages[name]["status"] for name in ("collect", "prepare", "train", "evaluate")] == ["ran"] * 4, run
    for name in ("deploy", "monitor", "retrain"):  # one honest line each, nothing run
        assert stages[name]["status"] == "not built", stages[name]
        assert stages[name]["error"].startswith("not built for a "), stages[name]["error"]
    evaluated = stages["evaluate"]["summary"]
    registry = Registry(project)
    meta = registry.meta(evaluated["model_version"])
    load_model(registry, evaluated["model_version"])  # the registry loads the task's model back
    report = (project / "reports" / run["run_id"] / "04_evaluate.html").read_text()
    return run, evaluated, {**meta, "report": report}


def test_heart_severity_grades_are_trained_and_judged_as_classes(example_templates):
    run, evaluated, meta = run_example("heart-severity", example_templates)
    assert meta["task"] == "multiclass" and meta["decision"]["task"] == "multiclass"
    assert evaluated["headline"].startswith(f"Model version {evaluated['model_version']} passed the gate: balanced")
    assert 0.3 < evaluated["metrics"]["balanced_accuracy"] < 0.8 and evaluated["metrics"]["roc_auc"] > 0.75
    assert evaluated["fairness"]["sex"]["balanced_accuracy_difference"] is not None
    assert "Grade 4 is too rare" in meta["report"]  # Hungary has no grade 4, Cleveland 13: named, not judged


def test_bike_sharing_rentals_are_predicted_with_an_interval(example_templates):
    run, evaluated, meta = run_example("bike-sharing", example_templates)
    assert meta["task"] == "regression" and meta["decision"]["target"] == 0.9
    assert meta["decision"]["fitted_on_rows"] > 1000  # calibrated on the validation split, rows the model never saw
    assert 0.8 < evaluated["metrics"]["coverage"] < 0.97, evaluated["metrics"]  # near 90% on the test weeks
    assert evaluated["metrics"]["r2"] > 0.5 and "MAE" in evaluated["headline"]
    assert evaluated["fairness"]["weathersit"]["relative_mae_difference"] is not None
    assert "ROC AUC" not in meta["report"] and "too few patients" not in meta["report"]  # the task's words
    assert json.dumps(evaluated).count("roc_auc") == 0
