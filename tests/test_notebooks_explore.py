"""After a run, each stage notebook runs top to bottom as a person runs it in JupyterLab: every cell, its checks on tiny
data included, with the parameters cell as written (run_dir empty: it reads the latest run, writes to runs/dev)."""

import os
import sys

import nbformat
import pytest
from conftest import REPO
from nbclient import NotebookClient

STAGES = ["01_collect", "02_prepare", "03_train", "04_evaluate", "05_deploy", "06_monitor", "07_retrain"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_notebook_runs_top_to_bottom_after_a_run(champion_project, stage):
    notebook = nbformat.read(REPO / "nbs" / f"{stage}.ipynb", as_version=4)
    # JupyterLab's working folder for `make lab` is nbs/; the settings file is found from there upward
    folder = champion_project / "nbs"
    folder.mkdir(exist_ok=True)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}})
    environment = {"PATH": f"{os.path.dirname(sys.executable)}:{os.environ.get('PATH', '')}", "WANDB_MODE": "offline"}
    previous = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
    try:
        client.execute()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert (champion_project / "runs" / "dev" / stage.split("_", 1)[1] / "summary.json").exists()
