"Shared fixtures: projects written into temporary folders, and the `lifecycle` command run as a user runs it."
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEART = REPO / "data" / "heart-disease-uci"
LIFECYCLE = Path(sys.executable).parent / "lifecycle"
QUICK = ("--stages", "collect,prepare", "-p", "prepare.profile=false")  # the data stages only, without the profile
COLUMNS = "age, sex, cp, trestbps, chol, fbs, restecg, thalach, exang, oldpeak, slope, ca, thal, num"


def run_lifecycle(*args, cwd=None, check=None):
    """Run the `lifecycle` command; return (exit code, parsed JSON when --json, stdout, stderr)."""
    done = subprocess.run([str(LIFECYCLE), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=900)
    parsed = None
    if "--json" in args and done.stdout.strip():
        parsed = json.loads(done.stdout)
    if check is not None:
        assert done.returncode == check, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.returncode, parsed, done.stdout, done.stderr


def stages(run):
    "The run's stages by name."
    return {stage["name"]: stage for stage in run["stages"]}


@pytest.fixture
def heart_project(tmp_path):
    "A copy of the default project (settings.ini and the UCI data) in a temporary folder."
    project = tmp_path / "heart"
    project.mkdir()
    shutil.copy(REPO / "settings.ini", project / "settings.ini")
    shutil.copytree(HEART, project / "data" / "heart-disease-uci")
    return project
