"""Refresh the README's pictures from the latest run's report, the live dashboard, the doctor's page and the latest
simulation's timeline: `make screenshots` (after `make run`; it runs the README's `lifecycle simulate` when no
simulation was made yet).

Drives Debian's chromium with playwright (never `playwright install`, which downloads a browser)."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGES = {"report-index.png": "index.html", "report-evaluate.png": "04_evaluate.html"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _crop_blank_bottom(path: Path) -> None:
    "Cut the white space under the page's last line."
    import numpy as np
    from PIL import Image

    image = Image.open(path)
    inked = np.flatnonzero(np.asarray(image.convert("L")).min(axis=1) < 250)
    if len(inked):
        image.crop((0, 0, image.size[0], min(image.size[1], int(inked[-1]) + 30))).save(path, optimize=True)


def dashboard(browser) -> None:
    "docs/dashboard.png: `lifecycle dashboard` on the project, once the monitor has computed its windows."
    port = _free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "lifecycle"),
            "dashboard",
            "--settings",
            str(ROOT / "settings.ini"),
            "--port",
            str(port),
            "--refresh",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in server.stdout:  # "Dashboard: http://…" once Voila listens
            if line.startswith("Dashboard:"):
                break
        page = browser.new_page(
            viewport={"width": 1280, "height": 1800}
        )  # Voila scrolls inside its own frame: a tall window
        page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
        page.wait_for_function(
            "document.body.innerText.includes('model in service') && document.body.innerText.includes('week of')",
            timeout=300_000,
        )
        time.sleep(3)  # the figures of the next refresh
        picture = ROOT / "docs" / "dashboard.png"
        page.screenshot(path=str(picture))
        _crop_blank_bottom(picture)
        print(f"docs/dashboard.png from lifecycle dashboard on {ROOT / 'settings.ini'}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def simulation(page) -> None:
    "docs/simulate.png: the timeline report of the latest `lifecycle simulate` on the project."
    made = sorted((ROOT / "simulations").glob("*/simulation.json"))
    if not made:
        print(
            "screenshots: no simulation yet; run `lifecycle simulate --inject bad-model` first (make screenshots does)",
            file=sys.stderr,
        )
        return
    import json

    report = Path(json.loads(made[-1].read_text())["report"])
    page.set_viewport_size({"width": 1280, "height": 1250})
    page.goto(report.resolve().as_uri(), wait_until="load")
    picture = ROOT / "docs" / "simulate.png"
    page.screenshot(path=str(picture))
    print(f"docs/simulate.png from {report.relative_to(ROOT)}")


def clinic(browser, settings: Path = ROOT / "settings.ini") -> None:
    """docs/clinic.png: `lifecycle clinic` on the project, one patient of VA Long Beach (production traffic) scored and
    explained."""
    import pandas as pd

    from lifecycle.bench.clinic import fill_clinic_form
    from lifecycle.bench.common import HEART_COLUMNS
    from lifecycle.clinic import form_fields
    from lifecycle.core import load_settings, read_json
    from lifecycle.registry import Registry

    project = load_settings(settings)
    registry = Registry(project.root)
    version = registry.resolve("champion")
    fields = form_fields(
        registry.meta(version),
        read_json(project.root / "registry" / "versions" / str(version) / "reference.json"),
        project,
    )
    patients = pd.read_csv(
        project.root / "data" / "heart-disease-uci" / "processed.va.data",
        header=None,
        names=HEART_COLUMNS,
        na_values="?",
    )
    patient = patients[patients.drop(columns="num").isna().sum(axis=1) == 2].iloc[
        0
    ]  # a patient with two tests not done
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "lifecycle"), "clinic", "--settings", str(settings), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in server.stdout:  # "Clinic: http://…" once Voila listens
            if line.startswith("Clinic:"):
                break
        page = browser.new_page(viewport={"width": 1000, "height": 1400})
        page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
        page.wait_for_selector("button.lc-submit", timeout=300_000)
        fill_clinic_form(
            page, {name: (None if pd.isna(value) else float(value)) for name, value in patient.items()}, fields
        )
        time.sleep(1)
        page.click("button.lc-submit")
        page.wait_for_selector(".lc-result .lc-answer", timeout=120_000)
        time.sleep(1)
        picture = ROOT / "docs" / "clinic.png"
        page.screenshot(path=str(picture), full_page=True)
        _crop_blank_bottom(picture)
        print(f"docs/clinic.png from lifecycle clinic on {settings}")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def main() -> int:
    report = ROOT / "reports" / "latest"
    if not report.exists():
        print("screenshots: no reports/latest; run `make run` first", file=sys.stderr)
        return 1
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for picture, name in PAGES.items():
            page.goto((report / name).resolve().as_uri(), wait_until="load")
            page.screenshot(path=str(ROOT / "docs" / picture), full_page=name == "index.html")
            print(f"docs/{picture} from reports/latest/{name}")
        simulation(page)
        dashboard(browser)
        clinic(browser)
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
