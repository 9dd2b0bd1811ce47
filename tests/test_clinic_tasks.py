"""The doctor's page of a multiclass and of a regression champion, for real: `lifecycle clinic` (Voila) on each example
project's champion, the form filled and submitted in Debian's chromium, the answer read in words and kept as a picture.

heart-severity's page names the most likely grade and every grade's probability, bike-sharing's the predicted rentals
with their interval and its coverage; both with the reasons and limits of a binary page."""

import os
import shutil
from pathlib import Path

import pytest
from conftest import free_port
from test_clinic import _start, _stop

# a record a person would type: numbers as text, a choice by its label on the page
PATIENT = {"age": "61", "sex": "male", "cp": "asymptomatic", "trestbps": "140", "chol": "260", "thalach": "120"}
PATIENT |= {"exang": "yes", "oldpeak": "2.5", "fbs": "no", "restecg": "normal", "slope": "flat"}
HOUR = {"hr": "5pm", "temp": "24", "atemp": "26", "hum": "45", "windspeed": "12", "season": "summer"}
HOUR |= {"holiday": "no", "weekday": "wed", "workingday": "yes", "weathersit": "clear"}
CASES = {
    "heart-severity": (
        PATIENT,
        ["Grade of heart disease: the probability of each class", "Most likely ", "; then ", "no heart disease ("],
        "the probability of",
    ),
    "bike-sharing": (
        HOUR,
        ["Predicted rentals", "rentals an hour; for 9 in 10 such predictions the true value falls between "],
        "the predicted rentals by",
    ),
}
# where the pictures go (docs/clinic_tasks.py sets it for the README); else the test's own folder
PICTURES = os.environ.get("LIFECYCLE_CLINIC_TASK_PICTURES")


def _fill(page, record: dict) -> None:
    "Type the record as a person would: a number into its box, a choice picked by its label."
    for name, value in record.items():
        box = page.locator(f".lc-field-{name} select")
        if box.count():
            box.select_option(value=value)  # ipywidgets: an option's value is its label
        else:
            page.locator(f".lc-field-{name} input").fill(value)


@pytest.mark.parametrize("name", list(CASES))
def test_the_page_answers_in_the_words_of_the_task(name, example_templates, browser, tmp_path):
    record, words, reason = CASES[name]
    shutil.copytree(example_templates(name), tmp_path / "copy", symlinks=True)
    settings = tmp_path / "copy" / "examples" / name / "settings.ini"
    port = free_port()
    clinic = _start(["clinic", "--settings", str(settings), "--port", str(port)], tmp_path, "clinic", "Clinic: http")
    try:
        page = browser.new_page(viewport={"width": 1000, "height": 1400})
        problems = []
        page.on("console", lambda message: message.type == "error" and problems.append(message.text))
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
        page.wait_for_selector("button.lc-submit", timeout=180_000)
        _fill(page, record)
        page.wait_for_timeout(400)
        page.click("button.lc-submit")
        page.wait_for_selector(".lc-result .lc-answer[data-task]", timeout=120_000)
        text = page.inner_text(".lc-result").replace("\xa0", " ")
        for expected in words:
            assert expected in text, (expected, text)
        assert "Why" in text and reason in text and "Limits" in text, text  # the same reasons and limits as binary
        assert "Answered by model version 1" in text and "Traceback" not in text, text
        assert not problems, problems
        picture = Path(PICTURES or tmp_path) / f"clinic-{name}.png"
        page.locator(".lc-result").scroll_into_view_if_needed()
        page.screenshot(path=str(picture), full_page=True)
        assert picture.stat().st_size > 10_000
    finally:
        assert _stop(clinic) == 0
