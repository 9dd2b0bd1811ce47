"""The tamper-evident record and the evidence pack on the shared trained project: any one-byte change to an entry of
the chain or to a file it names is found, and named; `lifecycle audit verify` says so in one line and exits 1; the
evidence pack is whole (every file in its manifest, with its SHA-256), loads nothing from elsewhere, escapes every
value and fills or marks every section."""

import hashlib
import json
import random
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lifecycle.audit_chain import CHAIN, KEY_ENV, verify
from lifecycle.cli import main

HOSTILE = "<script>alert('x')</script><img src=http://example.com/x.png>"


def _named_files(root: Path) -> dict[str, int]:
    "Every file the chain names, with the entry that names it last (the one verify judges it by)."
    named = {}
    for line in (root / CHAIN).read_bytes().splitlines():
        entry = json.loads(line)
        for name in entry["files"]:
            named[name] = entry["n"]
    return named


def _entry_at(data: bytes, offset: int) -> int:
    "The number of the chain's entry a byte belongs to (a line's newline belongs to it)."
    return data[:offset].count(b"\n") + 1


def test_any_one_byte_change_to_an_entry_or_a_named_file_is_found_and_named(champion_project):
    root = champion_project
    assert verify(root)["ok"], verify(root)
    named = _named_files(root)
    assert {"registry/events.jsonl", "registry/aliases.json", "registry/versions/1/model.skops"} <= set(named)
    assert any(name.endswith("collect/manifest.json") for name in named)  # the data manifest of the version's run
    rng = random.Random(25)
    targets = [CHAIN.as_posix()] + sorted(named)
    for trial in range(100):
        name = CHAIN.as_posix() if trial % 2 == 0 else rng.choice(targets)  # half the trials on the chain itself
        path = root / name
        original = path.read_bytes()
        offset = rng.randrange(len(original))
        changed = bytearray(original)
        changed[offset] = rng.choice([value for value in range(256) if value != original[offset]])
        path.write_bytes(bytes(changed))
        try:
            result = verify(root)
        finally:
            path.write_bytes(original)
        assert not result["ok"], f"trial {trial}: byte {offset} of {name} changed, not found"
        expected = _entry_at(original, offset) if name == CHAIN.as_posix() else named[name]
        assert result["first"]["n"] == expected, (trial, name, offset, result["first"])
    assert verify(root)["ok"]


def test_verify_names_the_entry_of_a_rewritten_events_file_and_exits_1(champion_project, capsys, monkeypatch):
    root, settings = champion_project, str(champion_project / "settings.ini")
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert main(["audit", "verify", "--settings", settings]) == 0
    assert capsys.readouterr().out.startswith("The record verifies: ")
    events = root / "registry" / "events.jsonl"
    events.write_text(events.read_text().replace('"actor": "gate"', '"actor": "person"', 1))  # history rewritten
    assert main(["audit", "verify", "--settings", settings]) == 1
    said = capsys.readouterr().out.strip()
    last = _named_files(root)["registry/events.jsonl"]
    assert said == (
        f"The record does not verify: entry {last} (alias, "
        f"{json.loads((root / CHAIN).read_bytes().splitlines()[last - 1])['at']}): "
        "registry/events.jsonl does not match its SHA-256."
    ), said
    # the settings may ask for signed entries: the key is then needed, and an unsigned chain fails
    (root / "settings.ini").write_text((root / "settings.ini").read_text() + "\n[audit]\nsigned = true\n")
    assert main(["audit", "verify", "--settings", settings]) == 1
    assert KEY_ENV in capsys.readouterr().err
    monkeypatch.setenv(KEY_ENV, "a-reviewer-key-of-enough-length")
    assert main(["audit", "verify", "--settings", settings, "--json"]) == 1
    assert "not signed" in json.loads(capsys.readouterr().out)["first"]["reason"]


class _Assets(HTMLParser):
    "Every element and attribute of a page that would load something, and every link."

    def __init__(self):
        super().__init__()
        self.loads, self.links, self.tags = [], [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "srcset", "data", "poster", "action") or (tag == "link" and name == "href"):
                self.loads.append((tag, name, value))
            elif name == "href":
                self.links.append(value)


def test_the_evidence_pack_is_whole_offline_escaped_and_fills_or_marks_every_section(champion_project, capsys):
    root, settings = champion_project, str(champion_project / "settings.ini")
    # a hostile reason, on the record through the promotion authority, reaches the change log and the plan's table
    assert main(["models", "promote", "1", "--reason", HOSTILE, "--settings", settings]) == 0
    capsys.readouterr()
    output = root.parent / "review"
    assert main(["audit", "champion", "--output", str(output), "--settings", settings, "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    manifest = json.loads((output / "manifest.json").read_text())
    on_disk = {path.relative_to(output).as_posix() for path in output.rglob("*") if path.is_file()}
    assert on_disk == set(manifest["files"]) | {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((output / name).read_bytes()).hexdigest() == entry["sha256"], name
    assert {"files/meta.json", "files/card.md", "files/chain.jsonl", "files/data-manifest.json"} <= set(on_disk)
    assert not any(name.endswith((".parquet", ".sqlite", ".csv", ".data")) for name in on_disk)  # no patient rows
    page = (output / "evidence.html").read_text()
    assets = _Assets()
    assets.feed(page)
    assert not assets.loads and "script" not in assets.tags and "img" not in assets.tags, assets.loads
    assert all(link.startswith(("#", "files/", "evidence.json")) for link in assets.links), assets.links
    assert not re.search(r"url\(|@import", page)
    assert HOSTILE not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    pack = json.loads((output / "evidence.json").read_text())
    keys = [part["key"] for part in pack["sections"]]
    assert keys[:9] == [
        "general",
        "data",
        "contract",
        "training",
        "validation",
        "fairness",
        "robustness",
        "gate",
        "oversight",
    ]
    assert {"risk", "changes", "standards", "declaration", "change_control", "monitoring"} <= set(keys)
    for part in pack["sections"]:  # filled from the project, or outside lifecycle in words
        assert part["filled"] == (part["outside"] is None), part["key"]
        assert part["filled"] or part["outside"].startswith("outside lifecycle: ") and len(part["outside"]) > 40
        assert not part["filled"] or part["paragraphs"] or part["tables"], part["key"]
    assert built["sections"]["risk"] == "outside lifecycle" and built["sections"]["validation"] == "filled"
    assert built["verified"] and pack["integrity"]["head"] in page
    changes = pack["change_control"]["changes"]
    assert [change["actor"] for change in changes] == ["gate", "person"] and all(c["within"] for c in changes)
    # the pack says who it is for: a folder of someone else's is never replaced
    (root / "notes").mkdir()
    (root / "notes" / "mine.txt").write_text("mine")
    assert main(["audit", "1", "--output", str(root / "notes"), "--settings", settings]) == 1
    assert "is not an evidence pack and not empty" in capsys.readouterr().err
    assert (root / "notes" / "mine.txt").read_text() == "mine"
    assert main(["audit", "1", "--output", str(output), "--settings", settings]) == 0  # its own pack: replaced


@pytest.mark.parametrize("word", ["7", "nobody"])
def test_an_unknown_version_is_one_line(champion_project, capsys, word):
    assert main(["audit", word, "--settings", str(champion_project / "settings.ini")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("lifecycle: ") and "\n" not in error
