"""Collect reads every kind of source, keeps lineage, and sets aside what it cannot parse; prepare accounts for every
row."""

import json
import re
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from conftest import COLUMNS, HEART, QUICK, run_lifecycle, stages

HEADER = COLUMNS.replace(" ", "")


def _heart_rows(name, count):
    return (HEART / f"processed.{name}.data").read_text().splitlines()[:count]


def test_a_project_of_many_source_formats(tmp_path):
    """CSV with a header, TSV, space-separated text, Parquet, JSON lines and SQLite in one project."""
    project = tmp_path / "clinics"
    (project / "in").mkdir(parents=True)
    names = COLUMNS.split(", ")
    cleveland = pd.read_csv(HEART / "processed.cleveland.data", header=None, names=names, na_values="?")
    # CSV with a header line and spelled-out sexes, TSV, space-separated without header.
    csv = cleveland.iloc[:40].copy()
    csv["sex"] = csv["sex"].map({1.0: " Male", 0.0: "female"})
    csv.to_csv(project / "in" / "north.csv", index=False)
    cleveland.iloc[40:80].to_csv(project / "in" / "south.tsv", sep="\t", index=False)
    cleveland.iloc[80:120].to_csv(project / "in" / "east.txt", sep=" ", index=False, header=False, na_rep="?")
    cleveland.iloc[120:160].to_parquet(project / "in" / "west.parquet", index=False)
    cleveland.iloc[160:200].to_json(project / "in" / "mobile.jsonl", orient="records", lines=True)
    with sqlite3.connect(project / "in" / "registry.db") as db:
        cleveland.iloc[200:303].to_sql("patients", db, index=False)
    (project / "settings.ini").write_text(f"""[data]
sources = north: in/north.csv
          south: in/south.tsv
          east: in/east.txt
          west: in/west.parquet
          mobile: in/mobile.jsonl
          registry: sqlite:///in/registry.db :: SELECT * FROM patients WHERE age > 0
columns = {COLUMNS}
na_values = ?
target = num
positive = 1, 2, 3, 4
negative = 0
[prepare]
recode = sex: male -> 1, female -> 0
missing_values = chol: 0
profile = false
""")
    _, run, _, _ = run_lifecycle(
        "run", "--settings", project / "settings.ini", "--stages", "collect,prepare", "--json", check=0
    )
    collect, prepare = stages(run)["collect"]["summary"], stages(run)["prepare"]["summary"]
    assert collect["rows_by_source"] == {
        "north": 40,
        "south": 40,
        "east": 40,
        "west": 40,
        "mobile": 40,
        "registry": 103,
    }
    assert collect["lines_malformed"] == 0
    assert prepare["rows_in"] == 303 and prepare["rows_quarantined"] == 0 and prepare["rows_duplicate"] == 0
    run_dir = Path(run["run_dir"])
    snapshot = pd.read_parquet(run_dir / "collect" / "snapshot.parquet")
    # Lineage: the header line is line 1, so the first CSV row is line 2; tables count rows.
    assert snapshot.loc[snapshot["_source"] == "north", "_line"].iloc[0] == 2
    assert snapshot.loc[snapshot["_source"] == "east", "_line"].iloc[0] == 1
    assert snapshot.loc[snapshot["_source"] == "registry", "_file"].iloc[0] == "sqlite:///in/registry.db"
    # Spelled-out sexes were unified with the numeric codes of the other sources.
    clean = pd.read_parquet(run_dir / "prepare" / "clean.parquet")
    assert sorted(clean["sex"].unique()) == [0.0, 1.0]
    assert clean.loc[clean["_source"] == "north", "sex"].tolist() == cleveland["sex"].iloc[:40].tolist()
    manifest = json.loads((run_dir / "collect" / "manifest.json").read_text())
    formats = {source["name"]: source["format"] for source in manifest["sources"]}
    assert formats == {
        "north": "text",
        "south": "text",
        "east": "text",
        "west": "parquet",
        "mobile": "jsonl",
        "registry": "sql",
    }
    assert all(len(source["sha256"]) == 64 for source in manifest["sources"] if source["format"] != "sql")


def _corrupted_lines():
    """Fifteen lines in the hospitals' layout, each with the fault its comment names (line = number + 1)."""
    good = _heart_rows("va", 12)
    return [
        ",".join(f"X{i}" for i in range(1, 15)),  # 0 an export tool's header   -> malformed
        good[0].replace("63,", "-5,", 1),  # 1 negative age            -> out_of_range:age
        good[1].replace("44,", "250,", 1),  # 2 absurd age              -> out_of_range:age
        good[2].replace(",4,", ",9,", 1),  # 3 unknown chest pain code -> unknown_category:cp
        good[3].rsplit(",", 1)[0] + ",?",  # 4 missing target          -> target_missing
        good[4].rsplit(",", 1)[0] + ",7",  # 5 unknown target value    -> target_unknown
        good[5].replace(",1,", ",abc,", 1),  # 6 text in a number column -> wrong_type:sex
        "#### export from the VA system ####",  # 7 junk line               -> malformed
        good[6] + ",1",  # 8 one field too many      -> malformed
        good[7],  # 9 good
        good[7],  # 10 duplicate of line 9
        good[8].replace("62,", '"62",', 1),  # 11 quoted but good
        good[9].replace("1,4,", "M,4,", 1),  # 12 sex spelled M          -> good after recode
        good[10],  # 13 good
        good[11][:9],  # 14 truncated last line    -> malformed
    ]


def test_corrupted_source_against_the_stored_schema(heart_project):
    """A later data version with every kind of fault: each row lands in exactly one place, with a reason."""
    settings = heart_project / "settings.ini"
    run_lifecycle("run", "--settings", settings, *QUICK, check=0)  # first version: the schema
    lines = _corrupted_lines()
    (heart_project / "data" / "va-export.data").write_text("\n".join(lines))  # no final newline: truncated
    text = settings.read_text().replace(
        "hungarian: data/heart-disease-uci/processed.hungarian.data",
        "hungarian: data/heart-disease-uci/processed.hungarian.data\n          va: data/va-export.data",
    )
    settings.write_text(text)
    _, run, _, stderr = run_lifecycle("run", "--settings", settings, *QUICK, "--json", check=0)
    collect, prepare = stages(run)["collect"]["summary"], stages(run)["prepare"]["summary"]
    assert collect["rows_by_source"]["va"] == 11
    assert collect["lines_malformed"] == 4
    malformed = pd.read_parquet(Path(run["run_dir"]) / "collect" / "malformed.parquet")
    assert malformed[["_source", "_line", "reason"]].values.tolist() == [
        ["va", 1, "a header line whose names are not [data] columns"],
        ["va", 8, "expected 14 fields, found 1"],
        ["va", 9, "expected 14 fields, found 15"],
        ["va", 15, "expected 14 fields, found 4"],
    ]
    assert prepare["rows_in"] == 597 + 11
    assert prepare["reasons"] == {
        "out_of_range:age": 2,
        "unknown_category:cp": 1,
        "target_missing": 1,
        "target_unknown": 1,
        "wrong_type:sex": 1,
    }
    assert prepare["rows_quarantined"] == 6
    assert prepare["rows_duplicate"] == 1 + 1
    assert prepare["rows_clean"] == 597 - 1 + 4
    assert prepare["rows_in"] == prepare["rows_clean"] + prepare["rows_quarantined"] + prepare["rows_duplicate"]
    quarantined = pd.read_parquet(Path(run["run_dir"]) / "prepare" / "quarantine.parquet")
    assert sorted(quarantined.loc[quarantined["_source"] == "va", "_line"]) == [2, 3, 4, 5, 6, 7]
    assert prepare["lines_malformed"] == 4
    assert prepare["schema_version"] == 1


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "lifecycle: stage 'collect' failed at cell {n}: source 'extra': file {path} not found"),
        (b"", "lifecycle: stage 'collect' failed at cell {n}: source 'extra': {path} is empty: it holds no rows"),
        (
            b"\n\n  \n",
            "lifecycle: stage 'collect' failed at cell {n}: source 'extra': {path} is empty: it holds no rows",
        ),
        (
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00",
            "lifecycle: stage 'collect' failed at cell {n}: source 'extra': {path} is a binary file",
        ),
    ],
)
def test_a_missing_empty_or_binary_source_is_one_line_naming_it(heart_project, content, expected):
    settings = heart_project / "settings.ini"
    path = heart_project / "data" / "extra.data"
    if content is not None:
        path.write_bytes(content)
    settings.write_text(
        settings.read_text().replace(
            "hungarian: data/heart-disease-uci/processed.hungarian.data",
            "hungarian: data/heart-disease-uci/processed.hungarian.data\n          extra: data/extra.data",
        )
    )
    code, _, _, stderr = run_lifecycle("run", "--settings", settings, *QUICK)
    assert code == 1
    line = stderr.strip().splitlines()[-1]
    prefix, _, rest = expected.partition("{n}")
    assert line.startswith(prefix), line
    assert rest.format(path=path) in line, line


def test_an_id_column_never_reaches_the_reports(tmp_path):
    """Patient identifiers stay in the data: not in reports, summaries, profiles or messages."""
    project = tmp_path / "ids"
    project.mkdir()
    names = COLUMNS.split(", ")
    data = pd.read_csv(HEART / "processed.cleveland.data", header=None, names=names, na_values="?")
    data.insert(0, "patient_id", [f"PX{90000 + i}" for i in range(len(data))])
    data.loc[5, "age"] = 300  # quarantined, so its row is in the quarantine file but not the report
    data.to_csv(project / "patients.csv", index=False)
    (project / "settings.ini").write_text("""[data]
sources = clinic: patients.csv
na_values = ?
target = num
positive = 1, 2, 3, 4
id = patient_id
[prepare]
ranges = age: 1..120
""")
    _, run, stdout, stderr = run_lifecycle("run", "--settings", project / "settings.ini", "--json", check=0)
    assert stages(run)["prepare"]["summary"]["reasons"] == {"out_of_range:age": 1}
    report = Path(run["report"]).parent
    texts = [path.read_text(errors="replace") for path in report.iterdir() if path.is_file()]
    texts += [stdout, stderr]
    assert (report / "prepare-data_quality.html").exists()
    identifier = re.compile(r"px9\d{4}", re.IGNORECASE)
    for text in texts:
        text = re.sub(r"[A-Za-z0-9+/=]{200,}", "", text)  # embedded images are base64, where any letters may occur
        assert not identifier.search(text)
