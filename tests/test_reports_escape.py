"No report runs a script: markup planted in values, column names and source names reaches every page of a run as text."

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
from conftest import COLUMNS, HEART, run_lifecycle

COLUMN = "<img src=x onerror=alert('xss-column')>"  # a column name
VALUES = ["<script>alert('xss-value')</script>", "<b>xss-bold</b>", "plain"]  # category values
SOURCE = "<u onmouseover=alert('xss-source')>north</u>"  # a source name in settings


class _Live(HTMLParser):
    """Planted markup that became elements: an event handler or attribute naming xss, or xss text inside script, style,
    b or u."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found, self.open = [], []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            name = (name or "").lower()
            if "xss" in name or (name.startswith("on") and "xss" in (value or "").lower()):
                self.found.append(f"<{tag} {name}={value!r}>")
        if tag in ("script", "style", "b", "u"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        if self.open and self.open[-1] == tag:
            self.open.pop()

    def handle_data(self, data):
        if self.open and "xss" in data.lower():
            self.found.append(f"<{self.open[-1]}>{data[:60]}")


def live_markup(page: str) -> list[str]:
    parser = _Live()
    parser.feed(page)
    return parser.found


def test_the_checker_finds_live_markup_and_not_escaped_text():
    assert live_markup(f"<td>{COLUMN}</td>") and live_markup(f"<p>{VALUES[0]}</p>") and live_markup(SOURCE)
    assert not live_markup(
        "<td>&lt;img src=x onerror=alert('xss-column')&gt;</td><td title=\"<script>xss</script>\">x</td>"
    )


def test_markup_in_data_and_settings_is_text_on_every_page(tmp_path):
    project = tmp_path / "hostile"
    project.mkdir()
    names = COLUMNS.split(", ")
    data = pd.read_csv(HEART / "processed.cleveland.data", header=None, names=names, na_values="?")
    data[COLUMN] = np.array(VALUES, dtype=object)[np.arange(len(data)) % 3]
    data.iloc[:150].to_csv(project / "north.csv", index=False)
    data.iloc[150:].to_csv(project / "south.csv", index=False)
    (project / "settings.ini").write_text(f"""[data]
sources = {SOURCE}: north.csv
          south: south.csv
target = num
positive = 1, 2, 3, 4
negative = 0
sensitive = sex, {COLUMN}
[evaluate]
min_auc = 0.5
max_fairness_gap = 1
max_latency_ms = 100000
min_group_size = 5
""")
    code, run, stdout, stderr = run_lifecycle(
        "run", "--settings", project / "settings.ini", "--stages", "collect,prepare,train,evaluate", "--json"
    )
    assert [stage["status"] for stage in run["stages"]] == ["ran"] * 4, stderr[-2000:]
    report = Path(run["report"]).parent
    pages = sorted(report.glob("*.html")) + sorted((project / "registry").rglob("*.html"))
    names = {page.name for page in pages}
    assert {"index.html", "03_train.html", "04_evaluate.html", "prepare-data_quality.html", "card.html"} <= names, names
    seen = {"value": False, "column": False, "source": False}
    for page in pages:
        text = page.read_text(errors="replace")
        assert not live_markup(text), (page.name, live_markup(text)[:5])
        seen["value"] |= "xss-value" in text
        seen["column"] |= "xss-column" in text
        seen["source"] |= "xss-source" in text
    assert all(seen.values()), seen  # the planted text is shown, as text
