"""The package's layers hold: every import arrow of every lifecycle module, read from its source, points down or
sideways.

A stage notebook's run section runs as the stage, so its imports count as the module's; the checks on tiny data
after each function are tests, like those in tests/, and do not count."""

import ast
import json
import re
from pathlib import Path

import pytest

import lifecycle

# The layers, bottom to top. A module may import modules of its own layer and of the layers below it, never above,
# with one more rule: no stage imports another stage (stages talk through the files of the run folder).
LAYERS = {
    "core": 0,  # settings, the project, the run context
    "files": 0,  # hashing, atomic writes
    "words": 0,  # the words of reports
    "access": 1,  # who may reach the servers: host names, origins, token strength, masked log lines
    # shared services, used by the stages and by serving alike
    "sources": 1,
    "labels": 1,  # who may label, whose labels decide (the prediction log's reader asks it)
    "sql_sources": 1,  # SQL sources, read only
    "saved_text": 1,  # text files as people save them: encoding, delimiter, decimal mark
    "rules": 1,  # the rules of one column, which the contract compiles
    "contract": 1,
    "metrics": 1,
    "multiclass": 1,  # a target of several classes: metrics and intervals, words, fairness gaps, paired comparison
    "multiclass_estimates": 1,  # beyond its labels: calibration, estimated performance (CBPE), conformal sets
    "model_card": 1,  # a version's card, in the project's words
    "card_formats": 1,  # the card as Model Card Toolkit JSON and a Hugging Face card, each checked against its schema
    "compare": 1,
    "registry": 1,
    "audit_chain": 1,  # the tamper-evident record: a hash chain of every change, which the registry appends to
    "tracking": 1,
    "lineage": 1,  # OpenLineage run events: stage runs, batch runs, retrains; to a file or an endpoint
    "drift": 1,
    "alerts": 1,
    "webhook": 1,  # posting alerts within a total deadline
    "monitoring": 1,  # the package names its parts' public names
    "monitoring.windows": 1,
    "monitoring.estimate": 1,  # estimates that survive label shift, and calibration drift
    "monitoring.figures": 1,
    "monitoring.sites": 1,  # every window's figures per site, its alerts labelled with the site, the fleet
    "monitoring.task_figures": 1,  # a multiclass or regression window's figures: accuracy, estimates, coverage
    "monitoring.store": 1,
    "monitoring.engine": 1,
    "rollback": 1,
    "promotion": 1,
    "tasks": 1,  # what depends on the kind of target (binary, multiclass, regression): one object a task
    "task_base": 1,  # the template of a task, which each task implements
    "task_retrain": 1,  # what retraining, promotion and rollback ask a task, and the binary task's answers
    "task_multiclass": 1,  # the multiclass task, on the multiclass libraries
    "task_regression": 1,  # the regression task, on the regression library
    "fairness": 1,  # the fairness audit: the evaluate stage's, and the clinic page's figures
    "regression": 1,  # regression's metrics, intervals, plots, conformal intervals, fairness gaps, paired comparison
    "regression_estimates": 1,  # regression without labels: direct loss estimation; conformal re-calibration
    # the stages, the dashboard and its server
    "collect": 2,
    "prepare": 2,
    "train": 2,
    "evaluate": 2,
    "gate": 2,  # the evaluate stage's gate and its checklist
    "deploy": 2,
    "monitor_words": 2,  # what `lifecycle monitor` prints: the latest window, sites and alerts in words
    "monitor_report": 2,  # the monitor stage (nbs/06_monitor): its tables, plot and headline
    "retrain": 2,
    "shadow": 2,  # the retrain stage's parts: a challenger in shadow, and judging a challenger
    "challenger": 2,
    "dashboard": 2,
    "dashboard_sections": 2,
    "dashboard_fleet": 2,  # the dashboard's sections on what runs where: sites worst first, the shadow
    "dashserver": 2,
    "pageserver": 2,  # the Voila process of the pages: guarded, bounded, its logs masked
    "clinic": 2,
    "clinic_form": 2,
    "clinic_html": 2,
    "evidence": 2,  # a version's evidence: the Annex IV sections, from its records and the project's settings
    "change_control": 2,  # the evidence's change-control plan, and every champion change judged against it
    "evidence_pack": 2,  # `lifecycle audit VERSION`: the evidence as a page, JSON and records, with their manifest
    "clinic_tasks": 2,  # the doctor's page for a multiclass or a regression model
    "label_import": 2,  # `lifecycle labels import`: a diagnoses file read by collect's readers, into the log
    # the serving side, the subpackage lifecycle.serving: scoring and the prediction log (its parts, bottom to top:
    # common, sqlite, postgres, stores, reader, rows, journal, runs, one_writer, writer) are shared services; the
    # server, batch, stream and replay sit beside the stages
    "serving": 1,
    "serving.scoring": 1,  # scoring's names in one place, from its parts: scorer, shadow
    "serving.answers": 1,  # what a version answers, by task: a score and decision, a class, a value and interval
    "serving.scorer": 1,
    "serving.shadow": 1,
    "serving.predlog": 1,
    "serving.predlog.common": 1,
    "serving.predlog.sqlite": 1,
    "serving.predlog.postgres": 1,
    "serving.predlog.stores": 1,
    "serving.predlog.reader": 1,
    "serving.predlog.rows": 1,
    "serving.predlog.journal": 1,
    "serving.predlog.runs": 1,
    "serving.predlog.one_writer": 1,  # the one process writing a SQLite log for the workers of `serve --workers N`
    "serving.predlog.writer": 1,
    "serving.serve": 2,  # the server, in parts: holder, checks, openapi, routes (the handlers), serve (the app)
    "serving.holder": 2,
    "serving.checks": 2,
    "serving.openapi": 2,
    "serving.routes": 2,
    "serving.workers": 2,  # `lifecycle serve --workers N`: the supervisor and its workers
    "serving.batch": 2,
    "serving.batch_chunks": 2,
    "serving.batch_dask": 2,
    "serving.stream": 2,
    "serving.stream_io": 2,
    "serving.replay": 2,
    # the runner, the benchmarks and the command line
    "pipeline": 3,
    "execute": 3,  # the runner's parts: a stage notebook executed and rendered, and the run's index page
    "report": 3,
    "bench": 3,  # the benchmarks, the package lifecycle.bench: one module a benchmark, and the parts they share
    "bench.common": 3,
    "bench.prepare": 3,
    "bench.train": 3,
    "bench.serve": 3,
    "bench.batch": 3,
    "bench.stream": 3,
    "bench.dashboard": 3,
    "bench.clinic": 3,
    "bench.monitor": 3,
    "bench.retrain": 3,
    "bench.estimate": 3,
    "bench.nannyml_side": 3,
    "bench.estimate_multiclass": 3,
    "bench.estimate_regression": 3,
    "bench.audit": 3,
    "cli": 3,
    "audit": 3,  # `lifecycle audit`: verify the record, write an evidence pack; its subcommands
    "audit_trace": 3,  # `lifecycle audit trace`: a served prediction back to its model's source lines
    "init_evidence": 3,  # what init reads in a column, each finding with its evidence in words
    "init_project": 3,  # `lifecycle init`: settings.ini for the user's data, each inferred line with its evidence
    "loop": 3,
    "simulate": 3,
    "simulate_figures": 3,
    "simulate_traffic": 3,
}
# Inside a package whose parts are ordered, a part imports only the parts before it.
ORDERED = [
    [
        "serving.predlog.common",
        "serving.predlog.sqlite",
        "serving.predlog.postgres",
        "serving.predlog.stores",
        "serving.predlog.reader",
        "serving.predlog.rows",
        "serving.predlog.journal",
        "serving.predlog.runs",
        "serving.predlog.one_writer",
        "serving.predlog.writer",
    ],
    ["monitoring.windows", "monitoring.figures", "monitoring.store", "monitoring.engine"],
]
STAGES = {"collect", "prepare", "train", "evaluate", "deploy", "monitor_report", "retrain"}
TOP = max(LAYERS.values())
# Arrows known to break the rules, each being removed on a branch of its own; remove an entry once its fix is merged.
KNOWN = {}


def imported_modules(source: str, module: str = "", package: str = "lifecycle") -> set[str]:
    """The package's modules a module's source imports, anywhere in it (at its top or inside a function), named by their
    path in the package (`serving.predlog`); `module` (`serving.batch`) resolves its relative imports."""
    here = [package] + module.split(".")[:-1] if module else [package]  # the package the module is in
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .core import …, from ..core import …, from . import core
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}".removeprefix(f"{package}.") in LAYERS else base
                for alias in node.names
            ]
        else:
            continue
        found |= {name.removeprefix(f"{package}.") for name in names if name.startswith(f"{package}.")}
    return {layer_name(name) for name in found}


def layer_name(module: str) -> str:
    """The name LAYERS knows a module by: itself, or the package it belongs to (`serving.predlog.open_log` →
    `serving.predlog`)."""
    while module not in LAYERS and "." in module:
        module = module.rpartition(".")[0]
    return module


def violations(imports: dict[str, set[str]]) -> list[str]:
    "Every arrow that breaks the layer rules, as `module -> module: why`."
    found = []
    for module, targets in sorted(imports.items()):
        for target in sorted(targets - {module}):
            if target not in LAYERS:
                continue  # reported by the test that every module has a layer
            if LAYERS[target] > LAYERS[module]:
                found.append(
                    f"{module} -> {target}: {module} (layer {LAYERS[module]}) imports a layer above it "
                    f"({LAYERS[target]})"
                )
            elif target in ("cli", "bench") and LAYERS[module] < TOP:
                found.append(f"{module} -> {target}: only the top imports the command line and the benchmarks")
            elif module in STAGES and target in STAGES:
                found.append(f"{module} -> {target}: a stage imports another stage")
            elif any(
                module in parts and target in parts and parts.index(target) > parts.index(module) for parts in ORDERED
            ):
                found.append(f"{module} -> {target}: a part of the package imports a part above it")
    return found


def run_section_code(notebook: Path) -> tuple[str | None, str]:
    """A notebook's module name and the code of its run section (the cells after `## Run the stage`), directives and
    magics removed."""
    cells = json.loads(notebook.read_text())["cells"]

    def text(cell):
        return "".join(cell["source"])

    module = next(
        (match.group(1) for cell in cells if (match := re.search(r"^#\|\s*default_exp\s+(\S+)", text(cell), re.M))),
        None,
    )
    start = next(
        (
            i
            for i, cell in enumerate(cells)
            if cell["cell_type"] == "markdown" and text(cell).startswith("## Run the stage")
        ),
        len(cells),
    )
    code = [text(cell) for cell in cells[start:] if cell["cell_type"] == "code"]
    lines = [line for line in "\n".join(code).splitlines() if not line.lstrip().startswith(("#|", "%", "!"))]
    return module, "\n".join(lines)


def package_imports() -> dict[str, set[str]]:
    "Each module's imports (subpackages included, named by their path): its source's, and its notebook's run section's."
    folder = Path(lifecycle.__file__).resolve().parent
    imports = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        if path.name == "_modidx.py" or parts == ("__init__",):
            continue
        module = ".".join(parts[:-1] if path.name == "__init__.py" else parts)
        imports[module] = imported_modules(
            path.read_text(), module if path.name != "__init__.py" else f"{module}.__init__"
        )
    notebooks = folder.parent / "nbs"
    for notebook in sorted(notebooks.glob("*.ipynb")):
        module, code = run_section_code(notebook)
        if module in imports:
            imports[module] |= imported_modules(code, module)
    return imports


def test_run_sections_are_read():
    "The notebooks are found (a test run from an installed package without them would check less than it says)."
    module, code = run_section_code(Path(lifecycle.__file__).resolve().parent.parent / "nbs" / "05_deploy.ipynb")
    assert module == "deploy" and "stage_context" in code and "test_eq" not in code


def test_every_module_has_a_layer():
    missing = sorted(set(package_imports()) - set(LAYERS))
    assert not missing, f"modules without a layer: {missing}; add them to LAYERS in {Path(__file__).name}"


def test_no_import_breaks_the_layers():
    found = violations(package_imports())
    unknown = [line for line in found if tuple(line.split(":")[0].split(" -> ")) not in KNOWN]
    assert not unknown, "imports that break the layers:\n" + "\n".join(unknown)


def test_known_exceptions_still_exist():
    "An exception that no longer happens is removed from KNOWN, so that it cannot come back unnoticed."
    found = {tuple(line.split(":")[0].split(" -> ")) for line in violations(package_imports())}
    gone = [arrow for arrow in KNOWN if arrow not in found]
    assert not gone, f"fixed, remove from KNOWN: {gone}"


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("core", "def f():\n    from lifecycle.cli import main\n", ["core -> cli"]),  # inside a function counts
        (
            "serving.scoring",
            "from ..bench import measure\n",
            ["serving.scoring -> bench"],
        ),  # relative, from a subpackage
        ("serving.stream", "from lifecycle import cli\n", ["serving.stream -> cli"]),
        ("deploy", "import lifecycle.collect\n", ["deploy -> collect"]),  # a stage importing a stage, same layer
        (
            "pipeline",
            "from lifecycle.bench import measure\nfrom .collect import collect\n",
            [],
        ),  # the top imports anything
        ("deploy", "from lifecycle.serving.serve import create_app\nfrom lifecycle.sources import read_source\n", []),
        (
            "serving.predlog.stores",
            "from .writer import open_log\n",
            ["serving.predlog.stores -> serving.predlog.writer"],
        ),
        ("serving.batch", "from .predlog import open_log\nfrom ..core import LifecycleError\n", []),
        ("serving.scoring", "from lifecycle.serving.predlog import open_log\n", []),  # a package, by its __init__
        ("metrics", "from lifecycle.serving import batch\n", ["metrics -> serving.batch"]),
        ("registry", "import lifecycle\nfrom lifecycle.core import read_json\n", []),
    ],
)
def test_the_rules_catch_a_bad_arrow(module, source, expected):
    found = violations({module: imported_modules(source, module)})
    assert [line.split(":")[0] for line in found] == expected


def test_nothing_reads_a_settings_file_by_name_or_decides_where_the_log_is():
    """The project is resolved once (`core.open_project`) and passed down: no module opens `<folder>/settings.ini`
    itself or reads a section's `log`. The benchmarks, the simulation and `lifecycle init` write projects of their
    own and open those."""
    package = Path(lifecycle.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).with_suffix("").as_posix().replace("/", ".")
        if name in ("core", "_modidx", "simulate", "init_project") or name.split(".")[0] == "bench":
            continue
        text = path.read_text()
        for pattern in (r'/ "settings\.ini"', r"/ SETTINGS_FILE", r'\.get\("log"'):
            offenders += [f"{name}: {pattern}" for _ in re.finditer(pattern, text)]
    assert not offenders, offenders


def circles(imports: dict[str, set[str]]) -> list[list[str]]:
    """The import circles among the package's modules (their strongly connected components of more than one module),
    each sorted; found by Tarjan's algorithm over the arrows `imports` gives, inside functions included."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(imports.get(module, set()) - {module}):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return sorted(found)


def test_the_circle_finder_finds_circles():
    arrows = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": {"f", "a"}}
    assert circles(arrows) == [["a", "b", "c"], ["d", "e"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    """Not even between modules of one layer, nor through an import inside a function: each module can be read before
    those above it."""
    found = circles(package_imports())
    assert not found, "import circles:\n" + "\n".join(" -> ".join(circle) for circle in found)
