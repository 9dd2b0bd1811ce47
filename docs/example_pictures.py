"""Refresh the example projects' pictures in the README: each example's run index and its doctor's page, answering one
record of its production traffic (`make example-pictures`; it first runs `lifecycle run --settings
examples/<name>/settings.ini` for an example that has no run yet).

heart-severity: a VA Long Beach patient (production), the grades' probabilities in words; bike-sharing: an hour of 2012
(production), the predicted rentals with their interval. Drives Debian's chromium with playwright (never
`playwright install`, which downloads a browser)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from playwright.sync_api import sync_playwright
from screenshots import ARGS, ROOT, _crop_blank_bottom, _free_port

LIFECYCLE = Path(sys.executable).parent / "lifecycle"
HEART_COLUMNS = "age sex cp trestbps chol fbs restecg thalach exang oldpeak slope ca thal num".split()


def production_record(name: str) -> dict:
    "One record of the example's production traffic: column -> value (None: missing)."
    if name == "heart-severity":
        patients = pd.read_csv(
            ROOT / "data" / "heart-disease-uci" / "processed.va.data", header=None, names=HEART_COLUMNS, na_values="?"
        )
        row = patients[patients.drop(columns="num").isna().sum(axis=1) == 2].iloc[0]  # two tests not done
    else:
        hours = pd.read_csv(ROOT / "examples" / name / "data" / "hours-2012.csv")
        row = hours[(hours["hr"] == "5pm") & (hours["workingday"] == "Yes") & (hours["weathersit"] == "Clear")].iloc[0]
    return {column: (None if pd.isna(value) else value) for column, value in row.items()}


def fill(page, record: dict, fields: list) -> None:
    "Type a record into the page as a person would: a number as text, a choice by its label."
    from lifecycle.core import value_key

    for field in fields:
        value = record.get(field.name)
        if field.kind == "choice":
            label = next(
                (
                    text
                    for sent, text in field.choices
                    if value is not None and value_key(sent).casefold() == value_key(value).casefold()
                ),
                "not done (missing)",
            )
            page.locator(f".lc-field-{field.name} select").select_option(value=label)
        else:
            # as a person types it: a tenth at most (the file's -8.9974 °C is typed -9)
            page.locator(f".lc-field-{field.name} input").fill("" if value is None else f"{round(float(value), 1):g}")


def index(page, name: str) -> None:
    "docs/<name>-index.png: the example's latest run index."
    report = ROOT / "examples" / name / "reports" / "latest" / "index.html"
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(report.resolve().as_uri(), wait_until="load")
    picture = ROOT / "docs" / f"{name}-index.png"
    page.screenshot(path=str(picture), full_page=True)
    _crop_blank_bottom(picture)
    print(f"docs/{picture.name} from examples/{name}/reports/latest/index.html")


def clinic(browser, name: str) -> None:
    "docs/<name>-clinic.png: `lifecycle clinic` on the example's champion, one production record answered."
    from lifecycle.clinic import form_fields
    from lifecycle.core import load_settings, read_json
    from lifecycle.registry import Registry

    settings = ROOT / "examples" / name / "settings.ini"
    project = load_settings(settings)
    registry = Registry(project.root)
    version = registry.resolve("champion")
    reference = read_json(project.root / "registry" / "versions" / str(version) / "reference.json")
    fields = form_fields(registry.meta(version), reference, project)
    port = _free_port()
    server = subprocess.Popen(
        [str(LIFECYCLE), "clinic", "--settings", str(settings), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in server.stdout:  # "Clinic: http://…" once Voila listens
            if line.startswith("Clinic:"):
                break
        page = browser.new_page(viewport={"width": 1000, "height": 1400})
        page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=300_000)  # a busy machine
        page.wait_for_selector("button.lc-submit", timeout=300_000)
        fill(page, production_record(name), fields)
        time.sleep(1)
        page.click("button.lc-submit")
        page.wait_for_selector(".lc-result .lc-answer", timeout=120_000)
        time.sleep(1)
        picture = ROOT / "docs" / f"{name}-clinic.png"
        page.screenshot(path=str(picture), full_page=True)
        _crop_blank_bottom(picture)
        print(f"docs/{picture.name} from lifecycle clinic on examples/{name}/settings.ini")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def main() -> int:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page()
        for name in ("heart-severity", "bike-sharing"):
            if not (ROOT / "examples" / name / "reports" / "latest" / "index.html").exists():
                subprocess.run([str(LIFECYCLE), "run", "--settings", str(ROOT / "examples" / name / "settings.ini")])
            index(page, name)
            clinic(browser, name)
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
