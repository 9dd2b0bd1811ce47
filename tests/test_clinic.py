"""`lifecycle clinic`, the doctor's page, for real: Voila, the page in Debian's chromium, and `lifecycle serve` beside
it.

The page's score must be the API's to the last bit, each score logged under channel `dashboard` with its version, a
refused record logged nowhere, and a new champion answering the next submission."""

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pandas as pd
from conftest import HEART_COLUMNS, LIFECYCLE, free_port

SCREENSHOT = os.environ.get("LIFECYCLE_CLINIC_SCREENSHOT")  # where to keep the picture (docs/screenshots.py sets it)


def _start(command, root: Path, name: str, ready: str):
    out = open(root / f"{name}.log", "w")
    process = subprocess.Popen([str(LIFECYCLE), *command], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while ready not in (root / f"{name}.log").read_text():
        assert process.poll() is None, (root / f"{name}.log").read_text()
        assert time.monotonic() < deadline, f"{name} did not start within 180 s"
        time.sleep(0.2)
    return process


def _stop(process):
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=120)


def _answer(page, before: str, seconds: float = 120) -> dict:
    "Wait for a new answer panel (a bound, never a speed assertion) and read its data attributes."
    page.wait_for_function(
        "(before) => { const a = document.querySelector('.lc-result .lc-answer');"
        " return a && a.dataset.requestId && a.dataset.requestId !== before; }",
        arg=before,
        timeout=seconds * 1000,
    )
    return page.evaluate(
        "() => ({...document.querySelector('.lc-result .lc-answer').dataset,"
        " text: document.querySelector('.lc-result').innerText})"
    )


def _submit(page, record, fields) -> dict:
    from lifecycle.bench.clinic import fill_clinic_form

    before = page.evaluate(
        "() => (document.querySelector('.lc-result .lc-answer') || {dataset: {}}).dataset.requestId || ''"
    )
    fill_clinic_form(page, record, fields)
    page.wait_for_timeout(400)
    page.click("button.lc-submit")
    return _answer(page, before)


def _refused(page, record, fields, field: str | None) -> tuple[str, str]:
    "Submit a record the contract refuses; wait for the message; return (the field's message, the page's message)."
    from lifecycle.bench.clinic import fill_clinic_form

    fill_clinic_form(page, {name: value for name, value in record.items() if not isinstance(value, str)}, fields)
    for name, text in record.items():
        if isinstance(text, str):
            page.locator(f".lc-field-{name} input").fill(text)
    page.wait_for_timeout(400)
    seen = page.evaluate(
        "() => (document.querySelector('.lc-message .lc-refused') || {dataset: {}}).dataset.submission || ''"
    )
    page.click("button.lc-submit")
    page.wait_for_function(
        "(seen) => { const refused = document.querySelector('.lc-message .lc-refused');"
        " return refused && refused.dataset.submission !== seen; }",
        arg=seen,
        timeout=120_000,
    )
    message = page.evaluate("() => document.querySelector('.lc-message').innerText")
    at_field = page.evaluate(f"() => document.querySelector('.lc-error-{field}').innerText") if field else ""
    assert (
        page.evaluate("() => document.querySelector('.lc-result').innerText.trim()") == ""
    )  # no score beside a refusal
    return at_field, message


def _second_version(root: Path) -> int:
    "A new champion: the same pipeline refitted on VA's patients (a different model), registered and promoted."
    from sklearn.base import clone

    from lifecycle.registry import Registry, load_model, register, set_alias
    from lifecycle.serving.scoring import Scorer, check_frame

    registry = Registry(root)
    scorer = Scorer.from_registry(root, 1)
    frame = pd.read_csv(
        root / "data" / "heart-disease-uci" / "processed.va.data",
        header=None,
        na_values="?",
        names=HEART_COLUMNS,
    )
    features, reasons = check_frame(frame, scorer.spec)
    labels = (frame.loc[(reasons == "").to_numpy(), "num"] > 0).astype(int).to_numpy()
    model = clone(load_model(registry, 1)).fit(features.reset_index(drop=True), labels)
    folder = root / "registry" / "versions" / "1"
    meta = {
        key: value for key, value in registry.meta(1).items() if key not in ("version", "sha256", "bytes", "created")
    }
    version = register(
        registry,
        model,
        meta,
        files={
            "reference.json": (folder / "reference.json").read_text(),
            "card.md": (folder / "card.md").read_text().replace("model version 1", "model version 2"),
        },
    )
    set_alias(registry, "champion", version, "test: a new champion while the clinic page is open")
    return version


def test_the_page_scores_as_the_api_explains_and_logs_under_channel_dashboard(champion_project, browser):
    from lifecycle.clinic import form_fields
    from lifecycle.core import load_settings, read_json
    from lifecycle.registry import Registry

    root = champion_project
    settings = load_settings(root / "settings.ini")
    fields = form_fields(
        Registry(root).meta(1), read_json(root / "registry" / "versions" / "1" / "reference.json"), settings
    )
    va = pd.read_csv(
        root / "data" / "heart-disease-uci" / "processed.va.data",
        header=None,
        na_values="?",
        names=HEART_COLUMNS,
    )
    rows = [
        {f.name: (None if pd.isna(row[f.name]) else float(row[f.name])) for f in fields} for _, row in va.iterrows()
    ]
    complete = next(r for r in rows if all(v is not None for v in r.values()))
    gappy = next(r for r in rows if r["ca"] is None and r["thal"] is None and sum(v is None for v in r.values()) <= 4)
    unusual = dict(
        complete, chol=650.0, trestbps=None
    )  # accepted by the contract (80..700), above training's highest; a rarely missing value
    records = [complete, gappy, unusual]

    api_port, page_port = free_port(), free_port()
    server = _start(
        ["serve", "--settings", str(root / "settings.ini"), "--port", str(api_port)], root, "serve", "Uvicorn running"
    )
    clinic = _start(
        ["clinic", "--settings", str(root / "settings.ini"), "--port", str(page_port)], root, "clinic", "Clinic: http"
    )
    api = f"http://127.0.0.1:{api_port}"
    page_ids, api_ids, url_ids = {}, set(), set()
    try:
        for _ in range(600):
            if httpx.get(api + "/ready").status_code == 200:
                break
            time.sleep(0.2)
        # the same page started with --url: it scores through the running server (started now, so it finds the server
        # up)
        url_port = free_port()
        remote = _start(
            ["clinic", "--settings", str(root / "settings.ini"), "--port", str(url_port), "--url", api],
            root,
            "clinic-url",
            "Clinic: http",
        )
        page = browser.new_page(viewport={"width": 1100, "height": 1500})
        problems, dialogs = [], []
        page.on(
            "console",
            lambda message: (
                problems.append(f"console {message.type}: {message.text}") if message.type == "error" else None
            ),
        )
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(f"http://127.0.0.1:{page_port}/", wait_until="load")
        page.wait_for_selector("button.lc-submit", timeout=180_000)
        form = page.evaluate("document.body.innerText")
        assert "chest pain type" in form and "serum cholesterol (mg/dl)" in form and "Heart disease" in form
        assert "typical angina" in page.locator(".lc-field-cp select").inner_text().replace(
            "\xa0", " "
        )  # a labelled choice, not the code 1
        assert "trained on 29" in page.locator(".lc-field-age input").get_attribute("placeholder")

        for index, record in enumerate(records):
            shown = _submit(page, record, fields)
            answer = httpx.post(api + "/predict", json=record, timeout=60).json()["predictions"][0]
            assert float(shown["score"]) == answer["score"], (
                index,
                shown["score"],
                answer["score"],
            )  # the API's score, to the last bit
            assert repr(answer["score"]) == shown["score"]
            assert shown["version"] == "1" == str(answer["model_version"])
            page_ids[shown["requestId"]] = 1
            api_ids.add(answer["request_id"])
            text = shown["text"]
            assert "Why" in text and ("raises the risk by" in text or "lowers the risk by" in text), text
            assert any(f"{band} risk" in text for band in ("low", "borderline", "high"))
            decision = (
                "refer for cardiology work-up"
                if answer["decision"] == 1
                else "no cardiology referral on this score alone"
            )
            assert f"Decision: {decision}" in text
            assert "Answered by model version 1" in text and "model card of version 1" in text
            if record is unusual:
                assert "serum cholesterol (mg/dl) 650 is above anything the model saw in training" in text, text
                assert "resting blood pressure (mm Hg) is missing: training almost never missed it" in text, text
                page.wait_for_timeout(500)
                picture = Path(SCREENSHOT) if SCREENSHOT else root / "clinic.png"
                page.screenshot(path=str(picture), full_page=True)
                assert picture.stat().st_size > 10_000
                page.click(".lc-result details.lc-limits summary")  # the model card's limitations, one click away
                assert page.locator(".lc-result details.lc-limits").evaluate("d => d.open")
                assert "Out of scope" in page.locator(".lc-result details.lc-limits").inner_text()
            if record is complete:
                assert "Every value is within what the model saw in training" in text

        # bad input: a message at the field, no score, nothing logged (checked in the log below)
        at_field, message = _refused(page, dict(complete, age="fifty"), fields, "age")
        assert "expected a number" in at_field and "nothing was logged" in message
        at_field, _ = _refused(page, dict(complete, age="300"), fields, "age")
        assert "outside the range 1 to 120" in at_field
        at_field, _ = _refused(page, dict(complete, chol="<img src=x onerror=alert(1)>"), fields, "chol")
        assert (
            "expected a number" in at_field and page.locator(".lc-clinic img, .lc-message img").count() == 0
        )  # never markup from a field
        _, message = _refused(page, {name: None for name in complete}, fields, None)
        assert "Too many fields are empty" in message
        assert "Traceback" not in page.evaluate("document.body.innerText")

        # a new champion answers the next submission, and the page says which version answered
        version = _second_version(root)
        shown = _submit(page, complete, fields)
        assert shown["version"] == str(version) and f"Answered by model version {version}" in shown["text"]
        changed = page.evaluate("() => document.querySelector('.lc-message').innerText")
        assert f"Model version {version} now answers (this form was made for version 1)" in changed, (
            changed
        )  # and it says so
        page_ids[shown["requestId"]] = version
        for _ in range(600):  # the server's watcher swaps within its interval
            if httpx.get(api + "/ready").json().get("model_version") == version:
                break
            time.sleep(0.1)
        answer = httpx.post(api + "/predict", json=complete, timeout=60).json()
        assert answer["model_version"] == version and float(shown["score"]) == answer["predictions"][0]["score"]
        api_ids.add(answer["predictions"][0]["request_id"])

        # the real page of `lifecycle clinic --url`: scored by the running server, which logs it under dashboard
        remote_page = browser.new_page(viewport={"width": 1100, "height": 1500})
        remote_page.on("pageerror", lambda error: problems.append(f"--url page error: {error}"))
        remote_page.goto(f"http://127.0.0.1:{url_port}/", wait_until="load")
        remote_page.wait_for_selector("button.lc-submit", timeout=180_000)
        shown = _submit(remote_page, gappy, fields)
        answer = httpx.post(api + "/predict", json=gappy, timeout=60).json()["predictions"][0]
        assert (
            shown["version"] == str(version) == str(answer["model_version"]) and repr(answer["score"]) == shown["score"]
        )
        assert "Why" in shown["text"] and f"Answered by model version {version}" in shown["text"]
        url_ids.add(shown["requestId"])
        api_ids.add(answer["request_id"])
        remote_page.close()
        refused = httpx.post(api + "/predict", json=gappy, headers={"X-Lifecycle-Channel": "batch"})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["header", "X-Lifecycle-Channel"]
        assert problems == [] and dialogs == [], (problems, dialogs)
        page.close()
    finally:
        clinic_code = _stop(clinic)
        remote_code = _stop(remote) if "remote" in locals() else 0
        server_code = _stop(server)
    assert remote_code == 0, (root / "clinic-url.log").read_text()[-1500:]
    assert clinic_code == 0 and server_code in (0, -signal.SIGTERM), (
        clinic_code,
        server_code,
        (root / "clinic.log").read_text()[-1500:],
    )

    from lifecycle.serving.predlog import open_log

    with open_log("", root) as log:  # replays the journal the page's kernel left
        log.flush()
    with sqlite3.connect(root / "predictions.sqlite") as database:
        logged = database.execute("SELECT request_id, channel, model_version FROM predictions").fetchall()
    dashboard = {request_id: version for request_id, channel, version in logged if channel == "dashboard"}
    online = {request_id for request_id, channel, _ in logged if channel == "online"}
    assert dashboard == {
        **page_ids,
        **{request_id: version for request_id in url_ids},
    }  # every score shown, none refused, with its version
    assert api_ids <= online and not (set(page_ids) & online)


def _without_chol(root: Path) -> int:
    """A new champion with other fields: the champion's recipe without serum cholesterol, fitted on VA's patients,
    registered and promoted."""
    from lifecycle.registry import Registry, register, set_alias
    from lifecycle.serving.scoring import Scorer, check_frame
    from lifecycle.train import build_pipeline

    registry = Registry(root)
    scorer = Scorer.from_registry(root, 1)
    frame = pd.read_csv(
        root / "data" / "heart-disease-uci" / "processed.va.data", header=None, na_values="?", names=HEART_COLUMNS
    )
    features, reasons = check_frame(frame, scorer.spec)
    labels = (frame.loc[(reasons == "").to_numpy(), "num"] > 0).astype(int).to_numpy()
    meta = {
        key: value for key, value in registry.meta(1).items() if key not in ("version", "sha256", "bytes", "created")
    }
    numeric = [name for name in meta["features"]["numeric"] if name != "chol"]
    meta["features"] = {**meta["features"], "numeric": numeric}
    model = build_pipeline("logistic_regression", numeric, list(meta["features"]["categorical"]))
    model.fit(features.drop(columns="chol").reset_index(drop=True), labels)
    folder = root / "registry" / "versions" / "1"
    version = register(
        registry,
        model,
        meta,
        files={"reference.json": (folder / "reference.json").read_text(), "card.md": (folder / "card.md").read_text()},
    )
    set_alias(
        registry, "champion", version, "test: a new champion without serum cholesterol while the clinic page is open"
    )
    return version


def test_the_identifier_is_logged_only_hashed_and_a_champion_with_other_fields_rebuilds_the_form(champion_project):
    """The page's own object, in-process (no browser needed): the identifier field of a project with `[data] id`, and
    the form rebuilt for a new champion."""
    from lifecycle.clinic import Clinic
    from lifecycle.core import open_project
    from lifecycle.serving.predlog import id_key, open_log, pseudonymize

    root = champion_project
    settings = root / "settings.ini"
    settings.write_text(settings.read_text().replace("\nid =\n", "\nid = patient_id\n"))
    va = pd.read_csv(
        root / "data" / "heart-disease-uci" / "processed.va.data", header=None, na_values="?", names=HEART_COLUMNS
    )
    complete = next(row for _, row in va.drop(columns="num").iterrows() if not row.isna().any())
    secret, too_long = "MRN-884213 Doe", "Z" * 250

    def page(clinic) -> str:
        return "".join(
            [clinic.title.value, clinic.message.value, clinic.result.value]
            + [error.value for error in clinic.errors.values()]
        )

    def fill(clinic, identifier):
        for field in clinic.fields:
            value = float(complete[field.name])
            clinic.inputs[field.name].value = int(value) if field.kind == "choice" else f"{value:g}"
        clinic.inputs["id"].value = identifier

    clinic = Clinic(open_project(root / "settings.ini"))
    try:
        assert (
            clinic.identifier is not None and clinic.identifier.name == "id" and "keyed hash" in clinic.identifier.title
        )
        fill(clinic, too_long)  # an identifier the log cannot keep: refused at its field, never echoed
        refused = clinic.submit()
        assert (
            refused["status"] == 422 and "printable text" in clinic.errors["id"].value and too_long not in page(clinic)
        )
        fill(clinic, secret)
        first = clinic.submit()
        assert first["status"] == 200 and first["prediction"]["model_version"] == 1
        assert secret not in page(clinic) and "MRN" not in page(clinic)

        version = _without_chol(root)
        stale = (
            clinic.submit()
        )  # the form still has serum cholesterol: the new champion refuses it, the page rebuilds the form
        assert stale["status"] == 422 and clinic.form_version == version and "chol" not in clinic.inputs
        message = clinic.message.value
        assert (
            f"Model version {version} now answers (this form was made for version 1); the form was rebuilt for it"
            in message
        ), message
        assert "Fields no longer used: serum cholesterol" in message and "not a field of the model" not in message, (
            message
        )
        assert (
            clinic.inputs["id"].value == secret and clinic.inputs["age"].value == f"{float(complete['age']):g}"
        )  # what was typed is kept
        second = clinic.submit()
        assert second["status"] == 200 and second["prediction"]["model_version"] == version
        assert secret not in page(clinic) and "Answered by model version 2" in clinic.result.value
    finally:
        clinic.client.close()
    with open_log("", root) as log:  # replays the journal
        log.flush()
    with sqlite3.connect(root / "predictions.sqlite") as database:
        logged = database.execute(
            "SELECT request_id, channel, model_version, id_hash, features FROM predictions"
        ).fetchall()
    shown = {first["prediction"]["request_id"]: 1, second["prediction"]["request_id"]: version}
    assert {row[0]: row[2] for row in logged if row[1] == "dashboard"} == shown  # the refused records logged nowhere
    hashed = pseudonymize(secret, id_key(root))  # exactly the hash POST /predict logs for this identifier
    assert [row[3] for row in logged if row[0] in shown] == [hashed, hashed]
    assert not any(secret in str(row) or "MRN" in str(row) for row in logged)
