"""A newcomer's first hour, as a test: the commands are copied from the README and the site's pages (never retyped
here), so a page that lies fails CI. The README and the getting-started page give the same two commands, the test
command is the one CI runs, `make run` runs the default project as the whole-lifecycle tests do, and the README's
"your own data" commands, run literally on a user's file, end with a passed run and its report."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from test_init import messy_csv

PAGES = REPO / "docs" / "pages"


def shell_block(page: Path, heading: str) -> list[str]:
    "The commands of the first ```sh block after a heading of a markdown page, without their comments."
    text = page.read_text()
    start = re.search(rf"^#+ {re.escape(heading)}\s*$", text, re.MULTILINE)
    assert start, f"{page.name} has no heading {heading!r}"
    block = re.search(r"```sh\n(.*?)```", text[start.end() :], re.DOTALL)
    assert block, f"{page.name}: no sh block after {heading!r}"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def make_recipe(target: str) -> list[str]:
    "The commands of a Makefile target's recipe."
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_the_two_commands_agree_and_ci_runs_the_test_command():
    readme = shell_block(REPO / "README.md", "Two commands")
    assert readme == shell_block(PAGES / "index.md", "Two commands") == ["make run", "make test"]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if not line.startswith("#")]
    assert readme[1] in ci  # CI calls the README's test command, as it is written
    # `make run` is the default project's whole lifecycle, which the shared trained project of the tests runs too
    # (conftest's champion_template, its profile off), and the GitHub workflow runs literally
    assert make_recipe("run") == ["$(BIN)/lifecycle run --settings settings.ini"]
    assert "run: make run" in (REPO / ".github" / "workflows" / "lifecycle.yml").read_text()


def test_your_own_data_as_the_readme_says(tmp_path):
    commands = shell_block(REPO / "README.md", "Your own data")
    assert commands == shell_block(PAGES / "tasks.md", "A project for your own data: `lifecycle init`")
    data = shlex.split(commands[0])[2]  # the file the README names: the user's own, here a spreadsheet's CSV
    messy_csv(tmp_path / data)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    outputs = []
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    report = re.search(r"(\S+/index\.html)", outputs[-1])
    assert report, outputs[-1][-2000:]
    path = Path(report.group(1))
    path = path if path.is_absolute() else tmp_path / path
    run = json.loads((path.parent / "run.json").read_text())  # every stage ran: the gate, deploy and monitoring too
    assert run["status"] == "passed" and {stage["status"] for stage in run["stages"]} == {"ran"}, run["stages"]
