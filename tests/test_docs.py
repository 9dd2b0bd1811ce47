"""The documentation site: built from the notebooks and the code as `make docs` builds it, whole (no broken link, no
saved cell error, nothing from the internet), and its pages opened in a real browser."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE_SCRIPT = ROOT / "docs" / "site.py"


def _site_module():
    spec = importlib.util.spec_from_file_location("docs_site", SITE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "The site, built once by the command `make docs` runs."
    work = tmp_path_factory.mktemp("docs")
    built = subprocess.run(
        [sys.executable, str(SITE_SCRIPT), "--site", str(work / "site"), "--work", str(work / "work")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert built.returncode == 0, built.stderr[-4000:]
    return work / "site"


def test_a_broken_link_and_a_saved_error_are_found(tmp_path):
    site = _site_module()
    (tmp_path / "sub").mkdir()
    (tmp_path / "index.html").write_text(
        '<a href="sub/page.html#x">ok</a><a href="missing.html">bad</a><img src="sub/pic.png">'
        '<a href="https://example.org/">out</a><a href="#top">anchor</a>'
    )
    (tmp_path / "sub" / "page.html").write_text('<a href="../index.html">up</a><a href="../nope/x.html">bad</a>')
    assert sorted(site.broken_links(tmp_path)) == [
        "index.html: missing.html",
        "index.html: sub/pic.png",
        "sub/page.html: ../nope/x.html",
    ]
    notebook = tmp_path / "n.ipynb"
    cell = {"cell_type": "code", "source": "1/0", "metadata": {}, "execution_count": 1}
    cell["outputs"] = [{"output_type": "error", "ename": "ZeroDivisionError", "evalue": "division by zero"}]
    notebook.write_text(json.dumps({"cells": [cell]}))
    assert site.notebook_errors(notebook) == ["n.ipynb: cell 0 saved an error: ZeroDivisionError: division by zero"]


def test_the_generated_references_say_what_the_code_does(site):
    from lifecycle.cli import COMMANDS
    from lifecycle.core import DATA_KEYS
    from lifecycle.serving.openapi import ENDPOINT_RESPONSES

    for name in COMMANDS:  # a page per command, its own --help
        assert f"lifecycle {name}" in (site / "commands" / f"{name}.html").read_text()
    settings = (site / "reference" / "settings.html").read_text()
    for key in DATA_KEYS:
        assert f"<code>{key}</code>" in settings
    assert "<code>coverage</code>" in settings and "[evaluate]" in settings  # a stage's parameter, from its notebook
    for section in ("labels", "servers", "clinic", "audit", "lineage"):  # the sections of services and pages
        assert f"[{section}]" in settings, section
    assert "<code>max_per_prediction</code>" in settings and "<code>allowed_hosts</code>" in settings
    api = (site / "reference" / "api.html").read_text()
    for path, method in ENDPOINT_RESPONSES:
        assert f"{method.upper()} {path}" in api
    for stage in ("01_collect", "04_evaluate", "07_retrain"):
        assert (site / "notebooks" / f"{stage}.html").exists()


def test_the_pages_open_in_a_browser_with_nothing_from_the_internet(site, browser):
    page = browser.new_page()
    outside, errors = [], []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.route(
        "**/*",
        lambda route: (
            route.continue_() if route.request.url.startswith("file:") else outside.append(route) or route.abort()
        ),
    )
    for path, heading in [
        ("index.html", "Getting started"),
        ("notebooks/02_prepare.html", "Prepare"),
        ("commands/serve.html", "lifecycle serve"),
        ("reference/settings.html", "settings.ini reference"),
        ("reference/api.html", "The HTTP API"),
        ("deploying.html", "Deploying to production"),
    ]:
        page.goto((site / path).as_uri())
        assert page.locator("h1").first.inner_text().strip() == heading, path
        assert page.locator("nav").count() > 0
    page.goto((site / "index.html").as_uri())
    page.get_by_role("link", name="Operating the loop").first.click()
    page.wait_for_load_state()
    assert page.url.endswith("operating.html")
    assert [route.request.url for route in outside] == []
    assert errors == []
    page.close()
