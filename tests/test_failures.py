"A run that fails says so in one line, keeps what it did, and resumes once the cause is fixed."

import os
import re
from pathlib import Path

import nbformat
import pytest
from conftest import QUICK, run_lifecycle, stages


def _append(path, text):
    path.write_text(path.read_text() + text)


def test_quarantine_gate_fails_the_run_in_one_line_then_resumes(heart_project):
    settings = heart_project / "settings.ini"
    bad = heart_project / "data" / "bad.data"
    # 200 rows with an absurd age: far more than the 20% the gate allows.
    bad.write_text("".join(f"{250 + i % 50},1,4,140,260,0,1,112,1,3,2,?,?,1\n" for i in range(200)))
    text = settings.read_text().replace(
        "hungarian: data/heart-disease-uci/processed.hungarian.data",
        "hungarian: data/heart-disease-uci/processed.hungarian.data\n          bad: data/bad.data",
    )
    settings.write_text(text)
    code, _, stdout, stderr = run_lifecycle("run", "--settings", settings, *QUICK)
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len([line for line in lines if line.startswith("lifecycle:")]) == 1
    message = lines[-1]
    assert message.startswith("lifecycle: stage 'prepare' failed at cell")
    assert "25.1% of rows quarantined or malformed (max 20%): out_of_range:age 200" in message
    assert "quarantine.parquet" in message
    notebook = Path(re.search(r"see (\S+02_prepare\.ipynb)", message).group(1))
    executed = nbformat.read(notebook, as_version=4)
    assert any(
        tag.startswith("papermill-error-cell")
        for cell in executed.cells
        for tag in cell.get("metadata", {}).get("tags", [])
    )  # the error banner
    words = re.sub(
        r"\S*/\S*", "<path>", message
    )  # paths left out: a temporary folder's name may hold any number (pytest-250)
    assert not any(str(age) in words for age in range(250, 300))  # patient values never in messages
    # The failed run's report says which stage failed.
    index = (notebook.parent / "index.html").read_text()
    assert "failed" in index
    # Raise the threshold (the fix): collect is reused, prepare resumes.
    code, run, _, _ = run_lifecycle(
        "run", "--settings", settings, *QUICK, "-p", "prepare.max_quarantine_share=0.3", "--json", check=0
    )
    assert [s["status"] for s in run["stages"]] == ["cached", "ran"]
    assert stages(run)["prepare"]["summary"]["reasons"] == {"out_of_range:age": 200}


DATA = (
    "[data]\nsources = a: data/heart-disease-uci/processed.cleveland.data\ntarget = num\npositive = 1\n"
    "columns = {cols}\n"
)


@pytest.mark.parametrize(
    "settings_text, expected",
    [
        (
            DATA + "[prepare]\nsede = 3\n",
            "lifecycle: settings.ini: [prepare] sede: unknown key 'sede' of stage prepare; "
            "did you mean 'seed'?; known keys:",
        ),
        (
            DATA + "[trian]\nseed = 3\n",
            "lifecycle: settings.ini: unknown section [trian]",
        ),
        (
            DATA + "targte = x\n",
            "lifecycle: settings.ini: unknown key 'targte' in section [data]",
        ),
        (
            "[data]\nsources = a: data/heart-disease-uci/processed.cleveland.data\ntarget = num\ntask = binary\n"
            "columns = {cols}\n",
            "lifecycle: settings.ini: [data] positive is required for a binary task",
        ),
        (
            DATA + "task = ordinal\n",
            "lifecycle: settings.ini: [data] task must be one of binary, multiclass, regression",
        ),
        (
            DATA + "[prepare]\nseed = many\n",
            "lifecycle: settings.ini: [prepare] seed = 'many' is not a int",
        ),
    ],
)
def test_settings_mistakes_are_one_line(heart_project, settings_text, expected):
    from conftest import COLUMNS

    (heart_project / "settings.ini").write_text(settings_text.format(cols=COLUMNS))
    code, _, _, stderr = run_lifecycle("run", "--settings", heart_project / "settings.ini")
    assert code == 1
    assert stderr.strip().startswith(expected), stderr
    assert len(stderr.strip().splitlines()) == 1


def test_command_line_mistakes_are_one_line(heart_project):
    settings = heart_project / "settings.ini"
    for args, expected in (
        (["--stages", "train_model"], "lifecycle: unknown stage 'train_model'"),
        (["-p", "seed=3"], "lifecycle: -p 'seed=3': write it as stage.key=value"),
        (["-p", "nowhere.seed=3"], "lifecycle: -p nowhere.…: unknown stage 'nowhere'"),
    ):
        code, _, _, stderr = run_lifecycle("run", "--settings", settings, *args)
        assert code == 1 and stderr.strip().startswith(expected), stderr
        runs = heart_project / "runs"
        assert not runs.exists() or [path.name for path in runs.iterdir()] == [".cache"]  # no run was started


def test_stages_whose_inputs_are_not_ready_are_one_line_and_leave_nothing(heart_project):
    code, _, _, stderr = run_lifecycle("run", "--settings", heart_project / "settings.ini", "--stages", "prepare")
    assert code == 1
    assert stderr.strip() == "lifecycle: stage 'collect' has no up-to-date outputs; include it: --stages collect,…"
    assert [p.name for p in (heart_project / "runs").iterdir()] == [".cache"]
    assert not (heart_project / "reports").exists() or not any((heart_project / "reports").iterdir())


def test_help_documents_every_command():
    for args in (["--help"], ["run", "--help"], ["bench", "--help"]):
        code, _, stdout, _ = run_lifecycle(*args)
        assert code == 0 and "usage: lifecycle" in stdout
    code, _, stdout, _ = run_lifecycle("run", "--help")
    for flag in ("--settings", "--stages", "--from", "-p", "--json"):
        assert flag in stdout


def _notebook(path, source):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(source),
    ]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "python3", "language": "python"}
    nbformat.write(notebook, path)
    return path


def test_a_hanging_stage_is_stopped_after_the_timeout(tmp_path):
    from lifecycle.execute import execute_stage

    notebook = _notebook(tmp_path / "hang.ipynb", "import time\ntime.sleep(600)")
    error = execute_stage(notebook, tmp_path / "out.ipynb", {"x": 2}, tmp_path, timeout=3)
    assert error == "a cell ran longer than the 3 s timeout ([run] timeout) and was stopped"
    assert (tmp_path / "out.ipynb").exists()


def test_a_failing_cell_is_named_with_its_error(tmp_path):
    from lifecycle.execute import execute_stage

    notebook = _notebook(tmp_path / "fail.ipynb", "raise ValueError('the reason')")
    error = execute_stage(notebook, tmp_path / "out.ipynb", {}, tmp_path, timeout=60)
    assert error == "cell 2: ValueError: the reason"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kernels_boot_ahead_and_none_is_left_running(tmp_path):
    from lifecycle.execute import Kernels, execute_stage

    kernels = Kernels(tmp_path)
    kernels.prepare()  # boots while the runner checks the cache
    booted = kernels._spare
    kernel = kernels.take()
    assert kernel is booted and kernel.manager.has_kernel
    kernel_pid = kernel.manager.provisioner.pid
    kernels.prepare()  # the next stage's kernel boots while this one runs
    spare = kernels._spare
    spare_pid = spare.manager.provisioner.pid
    notebook = _notebook(tmp_path / "pid.ipynb", "import os\nprint(os.getpid())")
    assert execute_stage(notebook, tmp_path / "out.ipynb", {}, tmp_path, timeout=60, kernel=kernel) is None
    ran_in = int(nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[-1].outputs[0]["text"])
    assert ran_in == kernel_pid  # the stage ran on the kernel that booted ahead
    assert not _alive(kernel_pid) and not Path(kernel._sockets).exists()  # stopped with its stage
    assert _alive(spare_pid)
    kernels.close()  # no stage came for the spare
    assert not _alive(spare_pid) and not Path(spare._sockets).exists()
