"The default project end to end: the whole run, its report, and the cache."

import re
import shutil
from pathlib import Path

import pandas as pd
from conftest import QUICK, REPO, run_lifecycle, stages

from lifecycle.pipeline import run_lifecycle as run_in_process


def test_default_project_runs_end_to_end_with_a_report(heart_project):
    code, run, _, _ = run_lifecycle("run", "--settings", heart_project / "settings.ini", "--json", check=0)
    assert run["status"] == "passed"
    by_name = stages(run)
    assert [s["name"] for s in run["stages"]] == [
        "collect",
        "prepare",
        "train",
        "evaluate",
        "deploy",
        "monitor",
        "retrain",
    ]
    assert {s["status"] for s in run["stages"]} == {"ran"}
    collect, prepare = by_name["collect"]["summary"], by_name["prepare"]["summary"]
    # Deployed: the smoke test over HTTP gave the offline scores exactly; the held-out hospitals were scored into the
    # log.
    deploy = by_name["deploy"]["summary"]
    assert (
        deploy["champion_version"] == by_name["evaluate"]["summary"]["model_version"]
    )  # the first model: champion since evaluate
    assert (
        deploy["smoke"]["identical"]
        and deploy["smoke"]["failed"] == 0
        and deploy["smoke"]["records"] == prepare["splits"]["test"]
    )
    assert (
        deploy["production"]["by_source"]["va"]["rows"] == 200
        and deploy["production"]["by_source"]["switzerland"]["rows"] == 123
    )
    assert deploy["production"]["scored"] + deploy["production"]["rejected"] == 323
    assert (
        deploy["predictions_in_log"] == deploy["production"]["scored"] == deploy["replay"]["scored"]
    )  # through replay, over 30 days
    # Replayed up to where the current monitoring window starts: the latest window monitored is a whole week, any
    # weekday.
    from lifecycle.monitoring import current_window_start

    assert pd.Timestamp(deploy["replay"]["last_event"]) < pd.Timestamp(current_window_start("week"))
    # Monitored: a month of history, the labels of the last week still pending.
    monitor = by_name["monitor"]["summary"]
    assert (
        monitor["predictions"] == deploy["production"]["scored"]
        and monitor["labeled"] == deploy["replay"]["labels_sent"] > 0
    )
    assert monitor["windows"] >= 5 and monitor["headline"] and monitor["figure"] == "monitoring.png"
    # Production against training, said in words: Switzerland never measures cholesterol (0 means "not measured").
    assert re.search(
        r"chol is missing in (\d+) of \1 records from switzerland \(100%\)", " ".join(deploy["production_warnings"])
    )
    assert (
        deploy["champion_story"].startswith("Model version 1 has been the champion since ")
        and "no champion yet" in deploy["champion_story"]
    )
    assert deploy["headline"].startswith("Model version 1 serves: smoke test of ")
    # Cleveland 303 + Hungarian 294 rows; one exact duplicate in the Hungarian file.
    assert collect["rows_by_source"] == {"cleveland": 303, "hungarian": 294}
    assert collect["lines_malformed"] == 0
    assert prepare["rows_in"] == 597
    assert prepare["rows_in"] == prepare["rows_clean"] + prepare["rows_quarantined"] + prepare["rows_duplicate"]
    assert prepare["rows_duplicate"] == 1
    assert sum(prepare["splits"].values()) == prepare["rows_clean"]
    # The report folder: executed notebooks, HTML without code, the data quality report, index.html.
    report = Path(run["report"]).parent
    assert report == heart_project / "reports" / run["run_id"]
    index = (report / "index.html").read_text()
    for name in (
        "01_collect.html",
        "02_prepare.html",
        "03_train.html",
        "04_evaluate.html",
        "05_deploy.html",
        "06_monitor.html",
        "01_collect.ipynb",
        "prepare-data_quality.html",
        "prepare-summary.json",
        "evaluate-model_card.html",
        "evaluate-summary.json",
    ):
        assert f'href="{name}"' in index, name
        assert (report / name).exists(), name
    collect_html = (report / "01_collect.html").read_text()
    # Code hidden: a line of the run section, which the report shows the outputs of (the notebook beside it holds the
    # line).
    run_line = "context = stage_context(settings, run_dir,"
    assert run_line in (report / "01_collect.ipynb").read_text() and run_line not in collect_html
    # Outputs shown: the run's printed line and its table of sources (not a number nbconvert's CSS also holds).
    assert "597 rows from 2 sources, 0 malformed lines set aside" in collect_html and re.search(
        r"<td[^>]*>303</td>", collect_html
    )
    assert "Data quality" in (report / "prepare-data_quality.html").read_text()
    # The evaluation report heads with every figure that decided the gate, beside its threshold.
    evaluate_html = (report / "04_evaluate.html").read_text()
    assert "Decision: model version 1" in evaluate_html and "single-record latency" in evaluate_html
    assert (
        "at most 50.0 ms" in evaluate_html
        and "lower end at most 0.300" in evaluate_html
        and "at least 0.750" in evaluate_html
    )
    # In words: the checklist with its verdicts, whom the model misses by sex (value labels, not codes), the measures
    # defined.
    assert (
        "Checklist" in evaluate_html and "| criterion |" not in evaluate_html and "<th>criterion</th>" in evaluate_html
    )
    assert "recall at the threshold, test split" in evaluate_html
    assert "By sex: the model misses" in evaluate_html and "of female patients with heart disease" in evaluate_html
    assert (
        "of male patients with heart disease" in evaluate_html
        and "Equalized odds difference</strong>: the largest gap" in evaluate_html
    )
    # Each stage's headline in words and its main plot as a thumbnail on the index page.
    evaluate = by_name["evaluate"]["summary"]
    assert evaluate["headline"].startswith("Model version 1 passed the gate: ROC AUC ") and evaluate[
        "headline"
    ] in index.replace("&amp;", "&")
    assert (
        collect["headline"] == "597 rows from 2 sources, 0 malformed lines set aside" and collect["headline"] in index
    )
    assert prepare["headline"].startswith("596 clean rows of 597") and by_name["train"]["summary"][
        "headline"
    ].startswith("Model version 1, ")
    for stage in ("collect", "prepare", "train", "evaluate"):
        assert (Path(run["run_dir"]) / stage / by_name[stage]["summary"]["figure"]).exists(), stage
    assert {by_name[stage]["summary"]["wandb"]["mode"] for stage in ("train", "evaluate")} == {"offline"}
    # The model card: titled from [data] title, the target in words, the data's licence, the groups too small named,
    # real lists.
    card = (report / "evaluate-model_card.html").read_text()
    assert "Model card: Heart disease, from the records of four hospitals (UCI), model version 1" in card
    assert "Predicts heart disease (against no heart disease)" in card and "CC BY 4.0" in card and "`" not in card
    assert "<ul><li>" in card and "Groups too small to judge:" in card and "female, age" in card
    # The data quality report profiles the clean data version's features, not the target or the lineage.
    quality = (report / "prepare-data_quality.html").read_text()
    assert f"Data quality: clean data version {prepare['clean_version']}" in quality and ">chol<" in quality
    assert not re.search(r">(num|_label|_source|_split)<", quality)
    deploy_html = (report / "05_deploy.html").read_text()
    assert "Production against training" in deploy_html and "serum cholesterol (mg/dl)" in deploy_html
    assert (
        "lifecycle models rollback" in deploy_html
        and "the CPU time the server spent on one single-record request" in deploy_html
    )
    assert (heart_project / "reports" / "latest").resolve() == report
    # Outputs in the run folder, state in the project folder, nothing in the working folder.
    run_dir = Path(run["run_dir"])
    clean = pd.read_parquet(run_dir / "prepare" / "clean.parquet")
    assert len(clean) == prepare["rows_clean"]
    assert set(clean["_split"]) == {"train", "val", "test"}
    assert (heart_project / "schema" / "current.json").exists()
    # The cleaning did its work: "0" cholesterol is missing, not zero.
    assert (clean["chol"] == 0).sum() == 0


class _NoKernel:
    def __init__(self, cwd):  # the project root
        raise AssertionError("a kernel was started")


def test_cache_reuses_unchanged_stages_and_reruns_changed_ones(heart_project, monkeypatch):
    settings = heart_project / "settings.ini"
    run_lifecycle("run", "--settings", settings, *QUICK, "--json", check=0)
    _, cached, _, _ = run_lifecycle("run", "--settings", settings, *QUICK, "--json", check=0)
    assert [s["status"] for s in cached["stages"]] == ["cached", "cached"]
    assert (Path(cached["run_dir"]) / "prepare" / "clean.parquet").exists()  # outputs linked into the new run
    assert (Path(cached["report"]).parent / "02_prepare.html").exists()  # and the report too
    # A run with every stage cached starts no kernel (the runner's function, with kernels that cannot start).
    monkeypatch.setattr("lifecycle.execute.Kernel", _NoKernel)
    in_process = run_in_process(settings, only=["collect", "prepare"], overrides=["prepare.profile=false"], quiet=True)
    assert [s["status"] for s in in_process["stages"]] == ["cached", "cached"]
    monkeypatch.undo()
    # A changed parameter re-executes that stage only.
    _, changed, _, _ = run_lifecycle("run", "--settings", settings, *QUICK, "-p", "prepare.seed=7", "--json", check=0)
    assert [s["status"] for s in changed["stages"]] == ["cached", "ran"]
    # --from re-executes a stage even when it is cached.
    _, forced, _, _ = run_lifecycle("run", "--settings", settings, *QUICK, "--from", "prepare", "--json", check=0)
    assert [s["status"] for s in forced["stages"]] == ["cached", "ran"]
    # A changed source file re-executes collect, and prepare after it (its input changed).
    source = heart_project / "data" / "heart-disease-uci" / "processed.hungarian.data"
    source.write_text(source.read_text() + "40,1,2,130,200,0,0,170,0,0,?,?,?,0\n")
    _, edited, _, _ = run_lifecycle("run", "--settings", settings, *QUICK, "--json", check=0)
    assert [s["status"] for s in edited["stages"]] == ["ran", "ran"]
    assert stages(edited)["prepare"]["summary"]["rows_in"] == 598
    # --stages runs only what is named, on the cached outputs of the stages before it.
    _, only, _, _ = run_lifecycle(
        "run", "--settings", settings, *QUICK, "-p", "prepare.seed=3", "--stages", "prepare", "--json", check=0
    )
    assert [s["status"] for s in only["stages"]] == ["cached", "ran"]
    _, first_only, _, _ = run_lifecycle("run", "--settings", settings, "--stages", "collect", "--json", check=0)
    assert [s["name"] for s in first_only["stages"]] == ["collect"]


def test_a_deleted_schema_is_not_served_from_cache(heart_project):
    settings = heart_project / "settings.ini"
    run_lifecycle("run", "--settings", settings, *QUICK, "--json", check=0)
    (heart_project / "schema" / "current.json").unlink()
    _, again, _, _ = run_lifecycle("run", "--settings", settings, *QUICK, "--json", check=0)
    assert [s["status"] for s in again["stages"]] == ["cached", "ran"]
    assert (heart_project / "schema" / "current.json").exists()


def test_runs_from_any_folder_and_keeps_state_in_the_project(heart_project, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _, run, stdout, _ = run_lifecycle(
        "run", "--settings", heart_project / "settings.ini", *QUICK, cwd=elsewhere, check=0
    )
    assert list(elsewhere.iterdir()) == []
    assert re.search(r"Report: .*/reports/[^/]+/index.html", stdout)
    assert (heart_project / "runs").is_dir() and (heart_project / "reports").is_dir()


def test_the_wheel_carries_the_stage_notebooks(tmp_path):
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # a copy, so the build leaves nothing in the clone
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "lifecycle", "nbs"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("lifecycle-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lifecycle/nbs/01_collect.ipynb" in names and "lifecycle/nbs/02_prepare.ipynb" in names
    assert "lifecycle/pipeline.py" in names
    assert "lifecycle/serving/predlog/writer.py" in names and "lifecycle/serving/serve.py" in names  # the subpackages
    assert "lifecycle/schemas/model_card_toolkit/model_card.schema.json" in names  # the card formats' schemas
    assert (
        "lifecycle/schemas/model_card_toolkit/LICENSE" in names
        and "lifecycle/schemas/huggingface_model_card.schema.json" in names
    )


def test_stage_notebooks_ship_inside_the_package():
    from lifecycle.pipeline import discover_stages, stages_folder

    folder = stages_folder()
    assert (folder / "01_collect.ipynb").exists()
    assert [stage.name for stage in discover_stages(folder)][:2] == ["collect", "prepare"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"lifecycle.nbs" = "nbs"' in pyproject and '"lifecycle.nbs" = ["*.ipynb"]' in pyproject
