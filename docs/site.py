"""The documentation site, built from the notebooks and the code: `make docs` (python docs/site.py).

Quarto, which nbdev's own `nbdev-docs` renders with, is not installable offline: its PyPI package `quarto-cli` is a
source distribution that downloads the binary from GitHub while it installs. The site is built instead by MkDocs
(Material theme, its fonts and scripts served from the site itself) with mkdocs-jupyter rendering each notebook as
a page. Everything a page says about the command line, the settings and the HTTP API is generated from the code that
parses, reads and serves them, so a page cannot drift from what the program does.

The build fails on a broken link between pages (MkDocs' strict mode, then a check of every `href` and `src` of the
built HTML that stays on the site) and on an executed cell's error saved in a notebook.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "docs" / "pages"  # the hand-written pages (markdown)
PICTURES = ROOT / "docs"  # the README's pictures, shared with the site
STAGES = ["01_collect", "02_prepare", "03_train", "04_evaluate", "05_deploy", "06_monitor", "07_retrain"]
# Hand-written pages, in the order of the site's navigation: (file in docs/pages, title).
GUIDES = [
    ("index.md", "Getting started"),
    ("tour.md", "A tour of a run"),
    ("tasks.md", "Your own data and every kind of target"),
    ("deploying.md", "Deploying to production"),
    ("operating.md", "Operating the loop"),
    ("examples.md", "Examples"),
    ("benchmarks.md", "Benchmarks"),
    ("developing.md", "Layout and developing"),
]


def _code_block(text: str) -> str:
    return "```text\n" + text.rstrip() + "\n```\n"


def command_pages(out: Path) -> list[tuple[str, str]]:
    "One page per `lifecycle` command, from its parser's own help; returns (page, title) in the parser's order."
    from lifecycle.cli import COMMANDS
    from lifecycle.cli import parser as build_parser

    (out / "commands").mkdir(parents=True, exist_ok=True)
    top = build_parser()
    pages = []
    index = ["# The command line\n", (PAGES / "commands.md").read_text(), "## Every command\n"]
    index += ["Each command's page is its `--help`, generated from the parser.\n", _code_block(top.format_help())]
    subparsers = next(action for action in top._actions if isinstance(action, argparse._SubParsersAction))
    for name in COMMANDS:
        parser = subparsers.choices[name]
        page = f"commands/{name}.md"
        (out / page).write_text(f"# lifecycle {name}\n\n" + _code_block(parser.format_help()))
        index.append(f"- [`lifecycle {name}`]({name}.md): {html.escape(parser.description or '').splitlines()[0]}")
        pages.append((page, f"lifecycle {name}"))
    (out / "commands" / "index.md").write_text("\n".join(index) + "\n")
    return [("commands/index.md", "Overview")] + pages


def _cell(value) -> str:
    "A value as a markdown table cell: escaped, one line."
    text = " ".join(str(value).split())
    return html.escape(text).replace("|", "&#124;") or " "


# The sections of services and pages (not stages), each with the dict of keys its reader checks: either key -> meaning
# (the default said in the meaning), or key -> default with the meaning in the line's comment.
SERVICE_KEYS = [
    ("labels", "lifecycle.labels", "LABELS_KEYS"),
    ("servers", "lifecycle.access", "SERVERS_KEYS"),
    ("clinic", "lifecycle.clinic_form", "CLINIC_KEYS"),
    ("audit", "lifecycle.audit_chain", "AUDIT_KEYS"),
    ("lineage", "lifecycle.lineage", "LINEAGE_DEFAULTS"),
]


def _service_keys(module: str, name: str) -> list[tuple[str, str, str]]:
    "A section's keys as (key, default, meaning) cells, from the dict its reader checks and the comments beside it."
    import importlib
    import inspect

    keys = getattr(importlib.import_module(module), name)
    source = inspect.getsource(importlib.import_module(module))
    block = source[source.index(f"{name} = {{") :]
    first = block.split("\n", 1)[0]
    block = first if first.rstrip().endswith("}") else block[: block.index("\n}") + 2]  # one line, or up to its }
    comments = dict(re.findall(r'^\s*"(\w+)":.*?#\s*(.+)$', block, re.MULTILINE))
    rows = []
    for key, value in keys.items():
        if key in comments:  # key -> default, the meaning in its comment
            rows.append((key, f"`{_cell(value)}`" if value else "(empty)", _cell(comments[key])))
        else:  # key -> meaning
            rows.append((key, "(in the meaning)", _cell(value)))
    return rows


def settings_page(out: Path) -> None:
    "The settings reference: every key of every section, with its default and meaning, read from the code."
    import papermill

    from lifecycle.core import DATA_KEYS, RUN_KEYS
    from lifecycle.pipeline import CONTEXT_PARAMETERS

    lines = [
        "# settings.ini reference\n",
        (PAGES / "settings.md").read_text(),
        "## Every key\n",
        "Generated from the code that reads each key: `[data]` and `[run]` from `lifecycle.core`, and every stage's "
        "section from its notebook's parameters cell (a key is a parameter; its default is the notebook's value). "
        "A key the code does not read is refused by name when the settings are loaded.\n",
    ]
    for section, keys in (("data", DATA_KEYS), ("run", RUN_KEYS)):
        lines += [f"## [{section}]\n", "| key | meaning |", "|---|---|"]
        lines += [f"| `{key}` | {_cell(meaning)} |" for key, meaning in keys.items()]
        lines.append("")
    for section, module, name in SERVICE_KEYS:
        lines += [
            f"## [{section}]\n",
            f"Read by `{module}` (`{name}`).\n",
            "| key | default | meaning |",
            "|---|---|---|",
        ]
        lines += [f"| `{key}` | {default} | {meaning} |" for key, default, meaning in _service_keys(module, name)]
        lines.append("")
    for stage in STAGES:
        section = stage.split("_", 1)[1]
        parameters = papermill.inspect_notebook(str(ROOT / "nbs" / f"{stage}.ipynb"))
        lines += [
            f"## [{section}]\n",
            f"The parameters of [{stage}.ipynb](../notebooks/{stage}.ipynb).\n",
            "| key | default | type | meaning |",
            "|---|---|---|---|",
        ]
        for name, parameter in parameters.items():
            if name in CONTEXT_PARAMETERS:  # given by the runner (the run's folder, the settings file), not settings
                continue
            lines.append(
                f"| `{name}` | `{_cell(parameter['default'])}` | {_cell(parameter['inferred_type_name'])} | "
                f"{_cell(parameter['help'])} |"
            )
        lines.append("")
    (out / "reference").mkdir(parents=True, exist_ok=True)
    (out / "reference" / "settings.md").write_text("\n".join(lines))


def api_page(out: Path) -> None:
    "The HTTP API: every endpoint, every status it answers and the schemas, from the server's OpenAPI code."
    from lifecycle.serving.openapi import AUTHENTICATED, ENDPOINT_RESPONSES, LABELLED, feedback_schemas, status_schemas

    lines = [
        "# The HTTP API\n",
        "`lifecycle serve` publishes its OpenAPI document at `/openapi.json` and an interactive page at `/docs`. The "
        "record schema is the model's own (its features, ranges, categories and the too-many-missing rule), so it is "
        "read from the server serving it; what follows is the part every project shares, generated from the code "
        "that builds the document.\n",
    ]
    for (path, method), responses in ENDPOINT_RESPONSES.items():
        access = "the scoring token, when one is set" if (path, method) in AUTHENTICATED else "open"
        if (path, method) == LABELLED:
            access = "a labeller's credential, always"
        lines += [
            f"## {method.upper()} {path}\n",
            f"Access: {access}.\n",
            "| status | body | meaning |",
            "|---|---|---|",
        ]
        lines += [
            f"| {status} | {_cell(schema)} | {_cell(meaning)} |" for status, (schema, meaning) in responses.items()
        ]
        lines.append("")
    lines.append("## Schemas shared by every project\n")
    for name, schema in {**feedback_schemas(), **status_schemas()}.items():
        lines += [f"### {name}\n", "```json", json.dumps(schema, indent=2, sort_keys=True), "```", ""]
    (out / "reference").mkdir(parents=True, exist_ok=True)
    (out / "reference" / "api.md").write_text("\n".join(lines))


def notebook_errors(notebook: Path) -> list[str]:
    "The saved outputs of a notebook that are an executed cell's error."
    cells = json.loads(notebook.read_text())["cells"]
    return [
        f"{notebook.name}: cell {i} saved an error: {output.get('ename', '')}: {output.get('evalue', '')}"
        for i, cell in enumerate(cells)
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]


def notebook_pages(out: Path) -> tuple[list, list]:
    "Every notebook copied for rendering: (stage pages, library pages) as (page, title)."
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    stages, library = [], []
    for notebook in sorted((ROOT / "nbs").glob("*.ipynb")):
        shutil.copy2(notebook, out / "notebooks" / notebook.name)
        page = (f"notebooks/{notebook.name}", notebook.stem)
        (stages if notebook.stem in STAGES else library).append(page)
    return stages, library


def _nav(pages: list[tuple[str, str]]) -> list[dict]:
    return [{title: page} for page, title in pages]


def write_config(src: Path, site: Path, stages: list, library: list, commands: list) -> Path:
    "mkdocs.yml for the generated sources: the navigation, the theme with nothing loaded from the internet."
    import yaml

    config = {
        "site_name": "lifecycle",
        "site_description": "Literate MLOps for people who build models in notebooks",
        "docs_dir": str(src),
        "site_dir": str(site),
        "use_directory_urls": False,  # pages open from the file system too, offline
        "strict": True,
        "theme": {"name": "material", "font": False, "features": ["navigation.sections", "search.suggest"]},
        "plugins": ["search", {"mkdocs-jupyter": {"execute": False, "include_source": True}}],
        "markdown_extensions": ["tables", "admonition", "toc", "pymdownx.superfences"],
        "validation": {"links": {"not_found": "warn", "anchors": "warn", "unrecognized_links": "warn"}},
        "nav": [
            *_nav([(page, title) for page, title in GUIDES]),
            {"The stages": _nav(stages)},
            {"Commands": _nav(commands)},
            {"Reference": [{"settings.ini": "reference/settings.md"}, {"HTTP API": "reference/api.md"}]},
            {"The notebooks": _nav(library)},
        ],
    }
    path = src.parent / "mkdocs.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append(value)


def broken_links(site: Path) -> list[str]:
    "Every link of the built site that stays on the site and names a file that is not there."
    broken = []
    for page in site.rglob("*.html"):
        parser = _Links()
        parser.feed(page.read_text(errors="replace"))
        for link in parser.links:
            parts = urlsplit(link)
            if parts.scheme or link.startswith(("//", "#", "mailto:", "data:", "javascript:")) or not parts.path:
                continue
            path = unquote(parts.path)  # a path from the site's root (404.html's) is the site's, not the disk's
            target = (site / path.lstrip("/") if path.startswith("/") else page.parent / path).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(site)}: {link}")
    return broken


def build(site: Path, work: Path) -> int:
    "Generate the sources, build the site, check it; 0 when it is whole."
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    src.mkdir(parents=True)
    errors = [error for notebook in sorted((ROOT / "nbs").glob("*.ipynb")) for error in notebook_errors(notebook)]
    for name, _ in GUIDES:  # a picture is ../x.png from docs/pages (as GitHub shows them), x.png on the site
        (src / name).write_text(re.sub(r"\]\(\.\./([\w-]+\.png)\)", r"](\1)", (PAGES / name).read_text()))
    for picture in PICTURES.glob("*.png"):
        shutil.copy2(picture, src / picture.name)
    stages, library = notebook_pages(src)
    commands = command_pages(src)
    settings_page(src)
    api_page(src)
    config = write_config(src, site, stages, library, commands)
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--quiet", "-f", str(config)], cwd=work)
    if built.returncode:
        errors.append(f"mkdocs build failed (exit {built.returncode}): a warning in strict mode, see above")
    else:
        errors += [f"broken link: {link}" for link in broken_links(site)]
        external = [
            f"{page.relative_to(site)}: {src_}"
            for page in site.rglob("*.html")
            for src_ in re.findall(r'<(?:script|link)[^>]+(?:src|href)="(https?://[^"]+)"', page.read_text())
        ]
        errors += [f"an asset from the internet: {item}" for item in external]
    for error in errors:
        print(error, file=sys.stderr)
    if not errors:
        print(f"the site is built in {site} ({sum(1 for _ in site.rglob('*.html'))} pages)")
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=ROOT / "_docs", help="where the site is written (default _docs)")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "docs", help="the generated sources")
    args = parser.parse_args(argv)
    return build(args.site.resolve(), args.work.resolve())


if __name__ == "__main__":
    sys.exit(main())
