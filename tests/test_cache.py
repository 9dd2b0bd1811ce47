"""A cache that cannot go stale: a row appended to any file a stage reads runs that stage again, and only the stages it
feeds."""

import json

from conftest import QUICK, run_lifecycle, stages

from lifecycle.serving.predlog import open_log

ROW = "58,1,4,130,230,0,2,140,1,1.2,2,?,7,1\n"  # one more patient, in the UCI files' layout


def _append(path, text):
    with open(path, "a") as handle:
        handle.write(text)


def _statuses(run):
    return {name: stage["status"] for name, stage in stages(run).items()}


def test_a_row_appended_to_an_input_runs_again_exactly_the_stages_that_read_it(champion_project):
    settings = champion_project / "settings.ini"
    whole = ("run", "--settings", settings, "-p", "prepare.profile=false", "--json")
    first = stages(json.loads((champion_project / "first-run.json").read_text()))
    _, run, _, _ = run_lifecycle(*whole, check=0)
    # nothing changed, nothing runs (in a copy of the project, too): monitoring neither, the log is where it was
    assert _statuses(run) == {name: "cached" for name in first}
    assert stages(run)["monitor"]["summary"] == first["monitor"]["summary"]

    # Whatever moves the log runs the monitor again, and it sees what came: a label, a prediction.
    monitor_only = ("run", "--settings", settings, "--stages", "monitor", "-p", "prepare.profile=false", "--json")
    with open_log("", champion_project) as log:
        served = log.predictions(features=False).query("channel != 'shadow'")["request_id"]
        waiting = set(served) - set(log.labels()["request_id"])
        log.record_label(min(waiting), 1, source="import", credential="test_cache")  # a trusted door
        assert log.flush()
    _, run, _, _ = run_lifecycle(*monitor_only, check=0)
    assert _statuses(run)["monitor"] == "ran"
    assert stages(run)["monitor"]["summary"]["labeled"] == first["monitor"]["summary"]["labeled"] + 1  # it saw it
    _, run, _, _ = run_lifecycle(*monitor_only, check=0)
    assert _statuses(run)["monitor"] == "cached"
    with open_log("", champion_project) as log:
        champion = json.loads((champion_project / "registry" / "aliases.json").read_text())["champion"]
        log.record_many(["test-cache-new"], [0.9], [1], None, champion)
        assert log.flush()
    _, run, _, _ = run_lifecycle(*monitor_only, check=0)
    assert _statuses(run)["monitor"] == "ran"
    assert stages(run)["monitor"]["summary"]["predictions"] == first["monitor"]["summary"]["predictions"] + 1
    # A [monitor] setting (the other sections and variables the monitor reads: nbs/10_pipeline's checks)
    text = settings.read_text()
    settings.write_text(text.replace("repeat_hours = 24", "repeat_hours = 12"))
    _, run, _, _ = run_lifecycle(*monitor_only, check=0)
    assert _statuses(run)["monitor"] == "ran"
    settings.write_text(text)

    # A production file: deploy reads it, so deploy runs again and scores the new row; nothing before it runs.
    _append(champion_project / "data" / "heart-disease-uci" / "processed.va.data", ROW)
    _, run, _, _ = run_lifecycle(*whole, check=0)
    # retrain reads the prediction log (its policy counts labeled predictions), so it runs again too
    assert _statuses(run) == {
        "collect": "cached",
        "prepare": "cached",
        "train": "cached",
        "evaluate": "cached",
        "deploy": "ran",
        "monitor": "ran",
        "retrain": "ran",
    }
    production = stages(run)["deploy"]["summary"]["production"]
    assert (
        production["by_source"]["va"]["rows"] == first["deploy"]["summary"]["production"]["by_source"]["va"]["rows"] + 1
    )
    assert production["new_in_log"] == 1  # the rows scored before are not logged twice
    # the row is in the log now: deploy is cached again (up to deploy only: monitoring would run for nothing)
    up_to_deploy = ("run", "--settings", settings, "--stages", "deploy", "-p", "prepare.profile=false", "--json")
    _, run, _, _ = run_lifecycle(*up_to_deploy, check=0)
    assert _statuses(run)["deploy"] == "cached"

    # The stored schema: prepare reads it, collect does not.
    _append(champion_project / "schema" / "current.json", "\n")
    _, run, _, _ = run_lifecycle("run", "--settings", settings, *QUICK, "--json", check=0)
    assert _statuses(run) == {"collect": "cached", "prepare": "ran"}

    # A source file: collect reads it; prepare reads collect's snapshot, which now holds one more row.
    _append(champion_project / "data" / "heart-disease-uci" / "processed.cleveland.data", ROW)
    _, run, _, _ = run_lifecycle("run", "--settings", settings, *QUICK, "--json", check=0)
    assert _statuses(run) == {"collect": "ran", "prepare": "ran"}
    assert stages(run)["collect"]["summary"]["rows"] == first["collect"]["summary"]["rows"] + 1
