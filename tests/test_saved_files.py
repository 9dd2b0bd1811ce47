"""Collect reads files as people save them: a byte-order mark, UTF-16, Windows-1252, a `;` delimiter with decimal
commas, tabs and pipes, quoted numbers, a delimiter ending every line, empty trailing lines, a header repeated in a
concatenated file, notes before the header and metadata after it. Each habit on a generated file, then the heart
data saved with each habit, collected and prepared: the prepared data equal the plain file's."""

import codecs

import pandas as pd
import pytest
from conftest import FEATURES, HEART, HEART_COLUMNS

from lifecycle.collect import collect
from lifecycle.core import LINEAGE, LifecycleError, load_settings
from lifecycle.prepare import prepare


def _project(folder, text: bytes, name="visits.csv", options="", sensitive="", columns=""):
    "A project of one text source holding `text`; returns its settings."
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(text)
    source = f"visits: {name}" + (f" :: {options}" if options else "")
    extra = (f"sensitive = {sensitive}\n" if sensitive else "") + (f"columns = {columns}\n" if columns else "")
    (folder / "settings.ini").write_text(
        f"[data]\nsources = {source}\ntarget = num\npositive = 1, 2, 3, 4\nna_values = ?\n{extra}"
    )
    return load_settings(folder / "settings.ini")


def _collect(folder, text: bytes, **kwargs):
    "Collect a project of one text source: (snapshot, malformed lines, the source's manifest entry)."
    snapshot, malformed, manifest = collect(_project(folder, text, **kwargs))
    return snapshot, malformed, manifest["sources"][0]


SMALL = "age,city,oldpeak,num\n61,Zürich,1.5,1\n45,São Paulo,0.2,0\n70,Köln,3.1,2\n"


def test_a_byte_order_mark_is_dropped_and_said(tmp_path):
    for mark, encoding in [
        (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"),
    ]:
        snapshot, malformed, entry = _collect(
            tmp_path / encoding, mark + SMALL.encode(encoding), sensitive="age"
        )  # `sensitive = age` names the first column, which the mark preceded
        assert list(snapshot.columns[:4]) == ["age", "city", "oldpeak", "num"], encoding
        assert snapshot["city"].tolist() == ["Zürich", "São Paulo", "Köln"] and snapshot["age"].tolist() == [61, 45, 70]
        assert entry["text"]["byte_order_mark"] == encoding and entry["text"]["encoding"] == encoding
        assert f"a {encoding} byte-order mark dropped" in entry["read_as"] and len(malformed) == 0
        assert snapshot["_line"].tolist() == [2, 3, 4]


def test_utf16_without_a_mark_and_windows_1252_are_detected(tmp_path):
    snapshot, _, entry = _collect(tmp_path / "u16", SMALL.encode("utf-16-le"))
    assert entry["text"]["encoding"] == "utf-16-le" and snapshot["city"].tolist()[0] == "Zürich"
    snapshot, malformed, entry = _collect(tmp_path / "cp", SMALL.replace("Köln", "Köln – Mülheim").encode("cp1252"))
    assert entry["text"]["encoding"] == "cp1252" and "read as cp1252 (detected)" in entry["read_as"]
    assert snapshot["city"].tolist() == ["Zürich", "São Paulo", "Köln – Mülheim"] and len(malformed) == 0


def test_stray_bytes_in_a_utf8_file_are_still_set_aside(tmp_path):
    "A byte that is no letter of any word does not make the file Windows-1252: its line is set aside, as before."
    snapshot, malformed, entry = _collect(tmp_path, b"age,chol,num\n61,250,1\n61,\xff\xfe,1\n45,180,0\n")
    assert entry["text"]["encoding"] == "utf-8" and snapshot["_line"].tolist() == [2, 4]
    assert malformed[["_line", "reason"]].values.tolist() == [[3, "bytes that are not utf-8 text"]]


def test_semicolons_with_decimal_commas(tmp_path):
    text = "age;city;oldpeak;num\n61;Zürich, Altstadt;1,5;1\n45;Bern;0,2;0\n70;Köln;3;2\n"
    snapshot, malformed, entry = _collect(tmp_path, text.encode())
    assert snapshot["oldpeak"].tolist() == [1.5, 0.2, 3.0] and snapshot["city"].tolist()[0] == "Zürich, Altstadt"
    assert (entry["text"]["delimiter"], entry["text"]["decimal"]) == ("semicolon", "comma")
    assert "fields split by semicolon (detected), decimal comma (detected)" in entry["read_as"]


@pytest.mark.parametrize("delimiter, word", [("\t", "tab"), ("|", "pipe")])
def test_tabs_and_pipes(tmp_path, delimiter, word):
    snapshot, malformed, entry = _collect(tmp_path, SMALL.replace(",", delimiter).encode(), name="visits.txt")
    assert entry["text"]["delimiter"] == word and snapshot["oldpeak"].tolist() == [1.5, 0.2, 3.1]
    assert len(malformed) == 0


def test_quoted_numbers_are_numbers(tmp_path):
    text = 'age,city,oldpeak,num\n"61","Zürich","1.5","1"\n"45","Bern, BE","0.2","0"\n'
    snapshot, malformed, entry = _collect(tmp_path, text.encode())
    assert snapshot["age"].dtype.kind in "if" and snapshot["oldpeak"].tolist() == [1.5, 0.2]
    assert snapshot["city"].tolist() == ["Zürich", "Bern, BE"] and entry["text"]["quoted_fields"]


def test_a_delimiter_ending_every_line_opens_no_column(tmp_path):
    text = "age;oldpeak;num;\r\n61;1,5;1;\r\n45;;0;\r\n"
    snapshot, malformed, entry = _collect(tmp_path, text.encode())
    assert [c for c in snapshot.columns if c not in LINEAGE] == ["age", "oldpeak", "num"]
    assert entry["columns_dropped"] == [] and entry["text"]["trailing_delimiter"] and len(malformed) == 0
    assert snapshot["oldpeak"].tolist()[0] == 1.5 and pd.isna(snapshot["oldpeak"].tolist()[1])


def test_empty_trailing_lines_are_ignored(tmp_path):
    snapshot, malformed, entry = _collect(tmp_path, (SMALL + "\n\n  \n").encode())
    assert len(snapshot) == 3 and len(malformed) == 0 and entry["lines_blank"] == 3


def test_a_repeated_header_is_set_aside_not_a_row(tmp_path):
    "Two exports joined: the second one's header (its byte-order mark too) sits in the middle."
    part = "age,oldpeak,num\n61,1.5,1\n45,0.2,0\n"
    snapshot, malformed, entry = _collect(tmp_path, codecs.BOM_UTF8 + part.encode() + codecs.BOM_UTF8 + part.encode())
    assert snapshot["age"].tolist() == [61, 45, 61, 45] and snapshot["age"].dtype.kind == "i"
    assert snapshot["_line"].tolist() == [2, 3, 5, 6]
    assert malformed[["_line", "reason"]].values.tolist() == [[4, "a repeated header line"]]


def test_notes_and_metadata_lines_are_set_aside_with_their_reason(tmp_path):
    text = (
        "Heart clinic export\n"
        "Exported 2024-03-01 by system X\n"
        "age,chol,oldpeak,num\n"
        "years,mg/dl,mm,\n"
        "# checked by the registrar\n"
        "61,250,1.5,1\n45,?,0.2,0\n70,180,3.1,2\n"
    )
    snapshot, malformed, entry = _collect(tmp_path, text.encode())
    assert snapshot["chol"].dtype.kind == "f" and snapshot["age"].dtype.kind == "i"  # no type change
    assert snapshot["_line"].tolist() == [6, 7, 8]
    assert malformed[["_line", "reason"]].values.tolist() == [
        [1, "a note line before the header"],
        [2, "a note line before the header"],
        [4, "a metadata line between the header and the data"],
        [5, "a metadata line between the header and the data"],
    ]


def test_decisions_set_on_the_source_line_win(tmp_path):
    text = "age;oldpeak;num\n61;1,5;1\n45;0,2;0\n".encode("latin-1")
    snapshot, _, entry = _collect(tmp_path, text, options="encoding=latin-1 delimiter=semicolon decimal=comma")
    assert snapshot["oldpeak"].tolist() == [1.5, 0.2]
    assert entry["text"]["set_on_source_line"] == ["encoding", "delimiter", "decimal"]
    assert "read as iso8859-1 (as set on its source line)" in entry["read_as"]
    snapshot, _, entry = _collect(tmp_path / "point", text, options="decimal=point")  # 1,5 stays text
    assert snapshot["oldpeak"].tolist() == ["1,5", "0,2"]
    with pytest.raises(LifecycleError, match=r"^source 'visits': unknown source option 'sep'"):
        _collect(tmp_path / "bad", text, options="sep=;")
    with pytest.raises(LifecycleError, match="source 'visits' has an option not written `key=value`"):
        _collect(tmp_path / "bad2", text, options="latin-1")


def test_the_quote_character_is_set_on_the_source_line(tmp_path):
    "`quote=` on the source line: single quotes hold a delimiter, `none` reads quotes as text; a wrong one, one line."
    text = b"age;city;oldpeak;num\n61;'Bad; Ems';'1,5';1\n45;'Chur';'0,2';0\n"
    snapshot, malformed, entry = _collect(tmp_path / "single", text, options="quote=' delimiter=semicolon")
    assert snapshot["city"].tolist() == ["Bad; Ems", "Chur"] and snapshot["oldpeak"].tolist() == [1.5, 0.2]
    assert entry["text"]["quote"] == "single" and entry["text"]["set_on_source_line"] == ["quote", "delimiter"]
    assert "some fields in single quotes (as set on its source line)" in entry["read_as"] and len(malformed) == 0
    # without the option, the single quotes are text: the quoted `;` splits a field, so those lines are set aside
    snapshot, malformed, entry = _collect(tmp_path / "double", text, options="delimiter=semicolon")
    assert entry["text"]["quote"] == "double" and malformed["_line"].tolist() == [2]
    text = b'age,note,num\n61,5" screw,1\n45,"plain",0\n'  # an inch mark is no quote: none keeps it as text
    snapshot, malformed, entry = _collect(tmp_path / "none", text, options="quote=none")
    assert snapshot["note"].tolist() == ['5" screw', '"plain"'] and len(malformed) == 0
    assert entry["text"]["quote"] == "none" and "no quote character (as set on its source line)" in entry["read_as"]
    with pytest.raises(LifecycleError, match=r"^source 'visits': source option quote must be one of double, single"):
        _collect(tmp_path / "bad", text, options="quote=backtick")


def test_a_plain_file_gives_the_snapshot_it_gave_before(tmp_path):
    "The default project's sources, plain UTF-8: the same snapshot version as before files were read as saved."
    from conftest import copy_default_project

    _, _, manifest = collect(load_settings(copy_default_project(tmp_path) / "settings.ini"))
    assert manifest["version"] == "1ddef6b79e758622"
    assert (
        manifest["sources"][0]["text"]["encoding"] == "utf-8" and manifest["sources"][0]["text"]["delimiter"] == "comma"
    )


# --- the heart data saved with each habit, collected and prepared ---------------------------------------------------


def _heart_tokens():
    "The Cleveland and Hungary rows as their text fields, as the UCI files hold them."
    lines = []
    for name in ("cleveland", "hungarian"):
        lines += [line.split(",") for line in (HEART / f"processed.{name}.data").read_text().splitlines() if line]
    return lines


def _saved(habit: str) -> tuple[bytes, str]:
    "The heart data saved with one habit: (the file's bytes, the source line's options)."
    rows = _heart_tokens()
    header = list(HEART_COLUMNS)
    delimiter, options = ",", ""
    if habit == "semicolon_decimal_comma":
        delimiter = ";"
        rows = [[value.replace(".", ",") for value in row] for row in rows]
    if habit in ("tab", "pipe"):
        delimiter = "\t" if habit == "tab" else "|"
    if habit == "quoted":
        rows = [[f'"{value}"' for value in row] for row in rows]
    lines = [delimiter.join(header)] + [delimiter.join(row) for row in rows]
    if habit == "trailing_delimiter":
        lines = [line + delimiter for line in lines]
    if habit == "repeated_header":
        lines.insert(304, lines[0])  # two files joined: Hungary's header after Cleveland's 303 rows
    if habit == "notes_and_metadata":
        lines = (
            ["Heart disease records, exported from Zürich", "2024-03-01"]
            + lines[:1]
            + ["years,,,mm Hg,mg/dl"]
            + lines[1:]
        )
    text = "\r\n".join(lines) + ("\r\n\r\n\r\n" if habit == "empty_trailing_lines" else "\r\n")
    if habit == "notes_and_metadata":
        return text.encode("cp1252"), options
    if habit == "utf16":
        return codecs.BOM_UTF16_LE + text.encode("utf-16-le"), options
    if habit == "latin1_set":
        return text.encode("latin-1"), "encoding=latin-1"
    prefix = codecs.BOM_UTF8 if habit == "bom" else b""
    return prefix + text.encode(), options


HABITS = [
    "bom",
    "utf16",
    "latin1_set",
    "semicolon_decimal_comma",
    "tab",
    "pipe",
    "quoted",
    "trailing_delimiter",
    "empty_trailing_lines",
    "repeated_header",
    "notes_and_metadata",
]


def _prepared(folder, text: bytes, options: str = "") -> tuple[pd.DataFrame, int, pd.DataFrame]:
    "Collect and prepare a project of the heart data: (clean rows, quarantined rows, malformed lines)."
    settings = _project(folder, text, options=options, sensitive="age, sex")
    snapshot, malformed, manifest = collect(settings)
    result = prepare(snapshot, settings, manifest["version"])
    clean = result["clean"][[*FEATURES, "num", "_label"]].reset_index(drop=True)
    return clean, len(result["quarantined"]), malformed


def test_the_heart_data_saved_with_each_habit_prepares_as_the_plain_file(tmp_path):
    plain_text, _ = _saved("plain")
    plain, quarantined, malformed = _prepared(tmp_path / "plain", plain_text)
    assert len(plain) > 500 and len(malformed) == 0
    for habit in HABITS:
        text, options = _saved(habit)
        clean, habit_quarantined, habit_malformed = _prepared(tmp_path / habit, text, options)
        pd.testing.assert_frame_equal(clean, plain, obj=habit)
        assert habit_quarantined == quarantined, habit
        expected = {"repeated_header": 1, "notes_and_metadata": 3}.get(habit, 0)
        assert len(habit_malformed) == expected, (habit, habit_malformed)
