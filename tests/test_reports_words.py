"""What a run's reports say: the model card shows the evaluation's own figures, tables speak words, deploy tells who
promoted."""

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

from lifecycle.core import open_project
from lifecycle.dashboard import read_state, render

# Lifecycle's own keys, as they would leak into a page: snake_case words, or a name with a leading underscore.
RAW_KEY = re.compile(r"^_?[a-z0-9]+(_[a-z0-9]+)+$|^_[a-z]+$")


class _Headers(HTMLParser):
    "The text of every table header cell (<th>) of a page."

    def __init__(self):
        super().__init__()
        self.headers, self._open = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "th":
            self._open = []

    def handle_data(self, data):
        if self._open is not None:
            self._open.append(data)

    def handle_endtag(self, tag):
        if tag == "th" and self._open is not None:
            self.headers.append("".join(self._open).strip())
            self._open = None


def _headers(page: Path) -> list[str]:
    parser = _Headers()
    parser.feed(page.read_text())
    return parser.headers


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_the_model_card_embeds_the_evaluation_reports_own_figures(champion_project, browser):
    report = champion_project / "reports" / "latest"
    run = json.loads((champion_project / "first-run.json").read_text())
    evaluated = Path(run["run_dir"]).name
    folder = champion_project / "runs" / evaluated / "evaluate"
    card = report / "evaluate-model_card.html"
    page = card.read_text()
    # the very pictures of the evaluation report: accuracy curves and recall by group with its intervals, in that order
    assert _embedded_pngs(page) == [(folder / "evaluation.png").read_bytes(), (folder / "fairness.png").read_bytes()]
    registered = champion_project / "registry" / "versions" / "1"
    assert _embedded_pngs((registered / "card.html").read_text()) == _embedded_pngs(page)
    assert "![" in (registered / "card.md").read_text() and (registered / "card-groups.png").exists()
    # nothing loaded from anywhere: every image is drawn from the page itself
    requests = []
    tab = browser.new_page()
    tab.on("request", lambda request: requests.append(request.url))
    tab.goto(card.as_uri(), wait_until="load")
    sizes = tab.eval_on_selector_all("img", "images => images.map(i => [i.naturalWidth, i.naturalHeight])")
    tab.close()
    assert len(sizes) == 2 and all(width > 300 and height > 150 for width, height in sizes), sizes
    assert [url for url in requests if not url.startswith(("file:", "data:"))] == []


def test_report_tables_and_the_index_speak_words_not_keys(champion_project):
    report = champion_project / "reports" / "latest"
    leaks = {
        page.name: keys
        for page in sorted(report.glob("0*.html"))
        if (keys := sorted({header for header in _headers(page) if RAW_KEY.match(header)}))
    }
    assert not leaks, leaks
    index = re.sub(r"<[^>]+>", " ", (report / "index.html").read_text())
    assert not re.findall(r"\b_?[a-z]+(?:_[a-z0-9]+)+:", index), re.findall(
        r"\b_?[a-z]+(?:_[a-z0-9]+)+:[^<]{0,20}", index
    )
    deploy = (report / "05_deploy.html").read_text()
    assert (
        "too_many_missing" not in deploy and "too many features missing" in deploy
    )  # refusals in words, in the text too


def test_deploy_summary_tells_when_and_by_whom_the_champion_was_promoted(champion_project):
    report = champion_project / "reports" / "latest"
    summary = json.loads((report / "deploy-summary.json").read_text())
    events = [json.loads(line) for line in (champion_project / "registry" / "events.jsonl").read_text().splitlines()]
    made = [event for event in events if event["alias"] == "champion"]
    assert (
        len(made) == 1 and made[0]["version"] == summary["champion_version"] == 1
    )  # evaluate made the first model champion
    assert "promoted" not in summary  # no "promoted: false" beside a page that says it is champion
    assert summary["champion"] is True
    assert summary["promotion"] == {
        "version": 1,
        "at": made[0]["at"],
        "by": made[0]["by"],
        "reason": made[0]["reason"],
        "by_this_stage": False,
    }
    assert made[0]["reason"].startswith("passed the gate in run")
    page = (report / "05_deploy.html").read_text()
    assert f"has been the champion since {made[0]['at']}" in page  # the page and the summary tell the same story


def test_the_dashboards_figures_state_unit_and_n_and_small_groups_are_words(champion_project):
    """Every figure of the dashboard says its unit and the n behind it (its picture's text, what a screen reader
    reads); fairness gaps that cannot be followed over time are a sentence naming the groups, their sizes and the
    minimum, never an empty plot. The default project's weeks hold about 60 patients, few of them women: no gap can
    be judged in two weeks."""
    project = open_project(champion_project / "settings.ini")
    pages = render(read_state(project), project.settings)
    fairness = pages["fairness"]
    assert "<img" not in fairness, "an empty plot where words belong"
    assert "at least 20 labelled positives" in fairness and "[monitor] min_group" in fairness
    assert re.search(r"sex: female \d+ rows? \(\d+ labelled positives?\), male \d+ rows", fairness), fairness
    said = {name: re.findall(r'<img alt="([^"]*)"', pages[name]) for name in ("scores", "accuracy")}
    assert re.search(r"x score \(probability of heart disease, 0 to 1\), y share of predictions", said["scores"][0])
    assert re.search(r"reference \(training, [\d,]+ patients\), week of .* \([\d,]+ predictions\)", said["scores"][0])
    assert re.search(
        r"x window start \(n = [\d,–]+ predictions a window\), y ROC AUC, recall \(0 to 1\)", said["accuracy"][0]
    )
