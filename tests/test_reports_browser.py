"Every page of a run, opened in a real browser: no console error, no warning or traceback text, every link resolves."

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Text that means something went wrong in a report: a Python traceback or warning, or a kernel's temporary file.
NOISE = re.compile(r"Traceback \(most recent call last\)|\b[A-Z]\w*Warning:|/tmp/ipykernel_|\bwarnings\.warn\(")


def _pages(report: Path) -> list[Path]:
    return sorted(report.glob("*.html"))


def _check_page(browser, page_path: Path) -> list[str]:
    "What is wrong with one page: console errors, page errors, noise in its text, links that lead nowhere."
    problems = []
    page = browser.new_page()
    page.on(
        "console", lambda message: message.type == "error" and problems.append(f"console error: {message.text[:200]}")
    )
    page.on("pageerror", lambda error: problems.append(f"page error: {str(error)[:200]}"))
    page.goto(page_path.as_uri(), wait_until="load")
    text = page.inner_text("body")
    if match := NOISE.search(text):
        problems.append(f"noise in the text: {text[max(match.start() - 80, 0) : match.end() + 80]!r}")
    ids = set(page.eval_on_selector_all("[id], a[name]", "nodes => nodes.map(n => n.id || n.name)"))
    for href in page.eval_on_selector_all("a[href]", "nodes => nodes.map(n => n.getAttribute('href'))"):
        parts = urlsplit(href)
        if parts.scheme in ("http", "https", "mailto", "javascript", "data"):
            continue  # outside the report (an offline machine cannot follow it); scripts are checked elsewhere
        if not parts.path:
            if parts.fragment and unquote(parts.fragment) not in ids:
                problems.append(f"link to a missing anchor: {href}")
            continue
        target = (page_path.parent / unquote(parts.path)).resolve()
        if not target.exists():
            problems.append(f"broken link: {href}")
    page.close()
    return problems


def test_every_page_of_a_run_reads_cleanly_in_a_browser(champion_project, browser):
    report = champion_project / "reports" / "latest"
    pages = _pages(report)
    names = {page.name for page in pages}
    assert {
        "index.html",
        "01_collect.html",
        "02_prepare.html",
        "03_train.html",
        "04_evaluate.html",
        "05_deploy.html",
    } <= names, names
    problems = {page.name: found for page in pages if (found := _check_page(browser, page))}
    assert not problems, problems
