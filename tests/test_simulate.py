"""`lifecycle simulate` on a copy of the default project seeded with PII canaries: the story (shadow, promotion or
refusal, an injected bad model rolled back by the rules) and, from the same run, a scan of every file, the command's
output and the dashboard page for the canaries (ids may appear only as keyed hashes)."""

import gzip
import json
import re
import secrets
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import COLUMNS, LIFECYCLE, copy_default_project, free_port, run_lifecycle

# One canary a patient in the id column, one in a free-text column: unique, so that any copy of either is found.
ID_MARK, NOTE_MARK = "canaryid", "canarynote"
# A small simulation: 12 days of twice the production traffic (resampled, jittered), labels back the next day, a retrain
# once 60 labels are in, its challenger a day in shadow, then the bad model. The default project's champion ranks
# production patients poorly (ROC AUC about 0.69), so telling a backwards model from it takes about 150 labels (DeLong
# at 0.05).
SIMULATE = (
    "simulate",
    "--days",
    "12",
    "--scale",
    "2",
    "--label-delay",
    "1",
    "--inject",
    "bad-model",
    "--inject-day",
    "3",
    "--shadow-days",
    "1",
    "--seed",
    "3",
    "-p",
    "prepare.profile=false",
    "-p",
    "retrain.min_new_labels=60",
    "-p",
    "retrain.bootstrap=200",
)


def _seed_canaries(project: Path) -> dict:
    """Rewrite the four hospitals' files with an id column (first) and a free-text column (last), each value a unique
    canary."""
    canaries = {}
    for path in sorted((project / "data" / "heart-disease-uci").glob("processed.*.data")):
        lines = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            token = secrets.token_hex(6)
            patient, note = f"{ID_MARK}{token}", f"{NOTE_MARK}{token} seen by dr smith"
            canaries[patient] = note
            lines.append(f"{patient},{line.strip()},{note}")
        path.write_text("\n".join(lines) + "\n")
    settings = (project / "settings.ini").read_text()
    settings = settings.replace(f"columns = {COLUMNS}", f"columns = pid, {COLUMNS}, note").replace(
        "id =\n", "id = pid\n"
    )
    assert "id = pid" in settings and "pid, age" in settings
    (project / "settings.ini").write_text(settings)
    return canaries


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    "One simulation serves every test here: the canary project, the command's output, the sandbox."
    project = copy_default_project(tmp_path_factory.mktemp("canaries"))
    canaries = _seed_canaries(project)
    code, outcome, stdout, stderr = run_lifecycle(*SIMULATE, "--settings", project / "settings.ini", "--json")
    assert code == 0, f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-5000:]}"
    # the plain-text form of the command too (its words go to a terminal, and to CI logs)
    return {
        "project": project,
        "canaries": canaries,
        "outcome": outcome,
        "output": stdout + stderr,
        "sandbox": Path(outcome["sandbox"]),
    }


def _events(sandbox: Path) -> list[dict]:
    return [json.loads(line) for line in (sandbox / "registry" / "events.jsonl").read_text().splitlines()]


def test_simulate_tells_the_story_and_the_bad_model_is_rolled_back_by_the_rules(simulated):
    outcome, sandbox = simulated["outcome"], simulated["sandbox"]
    kinds = [change["kind"] for change in outcome["changes"]]
    # the retrain policy fired on the labeled production patients, and its challenger ran in shadow before its verdict
    assert "shadow" in kinds, outcome["changes"]
    assert kinds.index("shadow") < next(i for i, kind in enumerate(kinds) if kind in ("promoted", "refused")), kinds
    # the bad model was promoted, and the rules brought the champion back by themselves, after it
    assert "injected" in kinds and "rolled back" in kinds and kinds.index("injected") < kinds.index("rolled back"), (
        outcome["changes"]
    )
    injected = next(change for change in outcome["changes"] if change["kind"] == "injected")["version"]
    events = _events(sandbox)
    champion_moves = [event for event in events if event["alias"] == "champion"]
    promotion_of_bad = next(i for i, event in enumerate(champion_moves) if event["version"] == injected)
    back = champion_moves[promotion_of_bad + 1]
    assert (back["previous"], back["version"]) == (injected, champion_moves[promotion_of_bad]["previous"])
    assert back["reason"].startswith(f"Automatic rollback of version {injected}") and "DeLong p = " in back["reason"], (
        back["reason"]
    )
    final = json.loads((sandbox / "registry" / "aliases.json").read_text())["champion"]
    later = [
        change["version"] for change in outcome["changes"][kinds.index("rolled back") :] if change["kind"] == "promoted"
    ]
    assert final == (later[-1] if later else back["version"]) != injected
    assert "shadow" not in json.loads(
        (sandbox / "registry" / "aliases.json").read_text()
    )  # the shadow run ended on the record
    assert [event["alias"] for event in events].count("shadow") == 2
    decisions = [json.loads(line) for line in (sandbox / "retrain" / "decisions.jsonl").read_text().splitlines()]
    rollback = [entry for entry in decisions if entry["kind"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["champion"] == injected and rollback[0]["labeled"] >= 50
    assert any(entry["kind"] == "promotion" and "after_shadow" in entry for entry in decisions)
    alerts = [json.loads(line) for line in (sandbox / "monitoring" / "alerts.jsonl").read_text().splitlines()]
    assert [alert["labels"]["alertname"] for alert in alerts].count("champion_rolled_back") == 1
    # the project's own state was not touched: the simulation ran in its sandbox
    assert (
        not (simulated["project"] / "registry").exists() and not (simulated["project"] / "predictions.sqlite").exists()
    )

    # the timeline report: beside the run's other reports, linked from its index, a row a day, every change with its
    # reason
    report = Path(outcome["report"])
    assert (
        report.parent == Path(outcome["index"]).parent
        and report.exists()
        and (report.parent / "simulate.png").stat().st_size > 10_000
    )
    assert 'href="simulate.html"' in Path(outcome["index"]).read_text()
    page = report.read_text()
    assert page.count("<tr>") >= 12 + len(outcome["changes"]) and "Automatic rollback of version" in page
    assert not re.search(r"(src|href)=['\"]?https?:", page)  # nothing from the internet
    days = outcome["days"]
    assert [day["day"] for day in days] == list(range(1, 13)) and sum(day["patients"] for day in days) == sum(
        day["scored"] for day in days
    )
    assert (
        sum(day["scored"] + day["refused"] for day in days) == 2 * 323
    )  # every resampled patient sent: scored, or refused by the contract
    assert any(day["roc_auc"] is not None for day in days) and all(
        day["estimated_roc_auc"] is not None for day in days if day["patients"]
    )


def _texts(path: Path) -> list[str]:
    """What a file holds, readably: the bytes, and inside zip, gzip and Parquet files (compressed: their bytes would
    hide a canary)."""
    data = path.read_bytes()
    texts = [data.decode("latin-1")]
    if zipfile.is_zipfile(path):  # model.skops, W&B artifacts
        with zipfile.ZipFile(path) as archive:
            texts += [archive.read(name).decode("latin-1") for name in archive.namelist()]
    elif data[:2] == b"\x1f\x8b":
        texts.append(gzip.decompress(data).decode("latin-1"))
    elif path.suffix == ".parquet":
        texts.append(pd.read_parquet(path).to_csv())
    return texts


# Data files hold the data, by design: the sources, and the collect and prepare stages' row files (they feed training).
def _is_data(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return parts[:1] == ("data",) or (
        parts[:1] == ("runs",) and len(parts) > 3 and parts[2] in ("collect", "prepare") and path.suffix == ".parquet"
    )


def _dashboard_html(settings: Path, browser) -> str:
    "The live dashboard's page, as chromium renders it."
    port, log = free_port(), settings.parent / "dashboard.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(LIFECYCLE), "dashboard", "--settings", str(settings), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while "Dashboard: http" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
        deadline = time.monotonic() + 120
        while "model in service" not in page.evaluate("document.body.innerText"):
            assert time.monotonic() < deadline, page.evaluate("document.body.innerText")[:2000]
            time.sleep(1)
        content = page.content()
        page.close()
        return content
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def test_no_canary_anywhere_but_in_the_data(simulated, browser):
    root, sandbox, canaries = simulated["project"], simulated["sandbox"], simulated["canaries"]
    dashboard = _dashboard_html(sandbox / "settings.ini", browser)
    assert "model in service" in dashboard
    needles = re.compile(f"{ID_MARK}[0-9a-f]{{12}}|{NOTE_MARK}[0-9a-f]{{12}}")
    found, scanned = {}, 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        if _is_data(path, root) or (path.is_relative_to(sandbox) and _is_data(path, sandbox)):
            continue
        scanned += 1
        for text in _texts(path):
            hits = needles.findall(text)
            if hits:
                found[str(path.relative_to(root))] = sorted(set(hits))[:3]
    for name, text in (("the command's output", simulated["output"]), ("the dashboard page", dashboard)):
        hits = needles.findall(text)
        if hits:
            found[name] = sorted(set(hits))[:3]
    assert found == {}, found
    # the scan can see a canary where one is by design: the prepared rows (compressed Parquet) hold every patient's
    clean = next(sandbox.glob("runs/*/prepare/clean.parquet"))
    assert len(set(needles.findall("".join(_texts(clean))))) > 500
    # the scan saw what it had to: the prediction log (with its hashed ids), reports, model cards, W&B files, alerts
    assert scanned > 100
    names = {path.name for path in sandbox.rglob("*")}
    assert {
        "predictions.sqlite",
        "card.html",
        "alerts.jsonl",
        "decisions.jsonl",
        "simulate.html",
        "index.html",
    } <= names
    assert any(path.suffix == ".wandb" for path in sandbox.rglob("*"))
    from lifecycle.serving.predlog import open_log

    with open_log("", sandbox) as log:
        logged = log.predictions()
    answered, shadow = logged[logged["channel"] != "shadow"], logged[logged["channel"] == "shadow"]
    assert (
        answered["id_hash"].notna().all() and answered["id_hash"].str.fullmatch(r"[0-9a-f]{16,64}").all()
    )  # ids as keyed hashes only
    assert (
        len(shadow) and shadow["id_hash"].isna().all()
    )  # a shadow's prediction keeps no id at all: it pairs by request id
    assert len(canaries) == 920


def test_the_evidence_pack_shows_every_model_change_with_its_evidence_and_only_the_injection_outside_the_protocol(
    simulated,
):
    "Issue 25: the first champion's evidence pack, from the simulation's record (its chain whole), and no canary in it."
    sandbox, outcome = simulated["sandbox"], simulated["outcome"]
    pack_folder = sandbox / "audit" / "review-v1"
    code, built, _, stderr = run_lifecycle(
        "audit", "1", "--settings", sandbox / "settings.ini", "--output", pack_folder, "--json"
    )
    assert code == 0, stderr
    assert built["verified"], built["first"]  # every change of the simulation is on the chain, and it holds
    pack = json.loads((pack_folder / "evidence.json").read_text())
    created = json.loads((sandbox / "registry" / "versions" / "1" / "meta.json").read_text())["created"]
    moves = [event for event in _events(sandbox) if event["alias"] == "champion" and event["at"] >= created]
    changes = pack["change_control"]["changes"]
    assert [(change["at"], change["version"]) for change in changes] == [(e["at"], e["version"]) for e in moves]
    assert all(change["evidence"] for change in changes), changes  # each with its gate, decision or comparison
    injected = next(change for change in outcome["changes"] if change["kind"] == "injected")["version"]
    outside = [change for change in changes if not change["within"]]
    assert [(change["version"], change["actor"]) for change in outside] == [(injected, "simulate")], outside
    assert outside[0]["why"].startswith("forced by simulate")  # the deliberate bad model, named as outside it
    back = next(change for change in changes if change["previous"] == injected)
    assert back["within"] and any(words.startswith("decision rollback") for words in back["evidence"])
    decisions = [json.loads(line) for line in (sandbox / "retrain" / "decisions.jsonl").read_text().splitlines()]
    retrains = {entry["retrain_id"] for entry in decisions if entry.get("retrain_id")}
    assert retrains and {impact["retrain"] for impact in pack["change_control"]["impacts"]} == retrains
    promoted = [change for change in changes if change["actor"] == "simulate" and change["within"]]
    assert all(any(words.startswith("comparison: ") for words in change["evidence"]) for change in promoted)
    needles = re.compile(f"{ID_MARK}|{NOTE_MARK}")
    for path in pack_folder.rglob("*"):
        assert not path.is_file() or not needles.search(path.read_text(errors="replace")), path
