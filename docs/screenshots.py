"""Refresh the README's pictures from the latest run's report: `make screenshots` (after `make run`).

Drives Debian's chromium with playwright (never `playwright install`, which downloads a browser)."""
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
PAGES = {"report-index.png": "index.html", "report-evaluate.png": "04_evaluate.html"}


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
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
