#!/usr/bin/env python3
"""Move the serving side into the subpackage `lifecycle.serving` and split the prediction log by concern.

    python tools/serving_layout.py            # apply (safe to re-run: a second run changes nothing)
    python tools/serving_layout.py --check    # say what would change; exit 1 if anything would
    .venv/bin/nbdev-clean && .venv/bin/nbdev-export

What it does, on any checkout of this repository:

- `nbs/30_scoring` → module `lifecycle.serving.scoring`; `32_serve`, `33_batch`, `34_stream`, `35_replay` become
  `35_serve`, `36_batch`, `37_stream`, `38_replay`, modules `lifecycle.serving.serve` … `.replay`.
- `nbs/31_predlog` is split by concern into `32_predlog_stores` (where the log lives, the two databases, the
  Parquet blocks, what a database error may say), `33_predlog_reader` (the committed predictions and labels as
  frames: `PredictionReader`) and `34_predlog_writer` (identifiers, rows, the journal, the queue and its writer
  thread: `PredictionLog`, which reads as a `PredictionReader`, and `open_log`). `31_predlog` stays as the
  package's page: its `__init__` re-exports every public name, so `from lifecycle.serving.predlog import open_log`
  works. Each cell goes where the names it defines belong (the tables below); a test cell goes with the names it
  uses. A cell it cannot place makes it stop, changing nothing, with the list: add its names to the tables.
- Every reference in nbs/ (code and markdown), tests/, docs/, README.md, Makefile, settings.ini, pyproject.toml,
  .ci/, .github/ and the Dockerfile; pyproject's package list; tests/test_layers.py and tests/test_imports.py
  read the subpackage; the old generated modules are deleted (nbdev-export writes the new ones).
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
SERVING = ("scoring", "predlog", "serve", "batch", "stream", "replay")
RENAMES = {  # old notebook → new notebook (the module names follow from MODULES)
    "32_serve": "35_serve",
    "33_batch": "36_batch",
    "34_stream": "37_stream",
    "35_replay": "38_replay",
}
MODULES = {  # notebook → its module
    "30_scoring": "serving.scoring",
    "35_serve": "serving.serve",
    "36_batch": "serving.batch",
    "37_stream": "serving.stream",
    "38_replay": "serving.replay",
}
PREDLOG = "31_predlog"
PARTS = {  # the prediction log's concerns, bottom to top: a part may import the parts before it, never after
    "stores": "32_predlog_stores",
    "reader": "33_predlog_reader",
    "writer": "34_predlog_writer",
}
ORDER = list(PARTS)

# Where each name the prediction log defines belongs. A piece of an exported cell that defines none of these
# names goes with the next piece of its cell that does (constants go with the function below them).
NAMES = {
    "stores": """DEFAULT_FILE log_location redact_url CHANNELS utc_text _json_value _finite features_json
        _SQLITE_SCHEMA _SQLITE_INSERT_PREDICTIONS _SQLITE_INSERT_LABELS _SQLITE_INSERT_BLOCKS _ADDED_COLUMNS
        _SQLITE_OVERLAPPING SQLiteStore _POSTGRES_SCHEMA _POSTGRES_INSERT_PREDICTIONS _POSTGRES_INSERT_LABELS
        _POSTGRES_INSERT_BLOCKS _POSTGRES_OVERLAPPING PostgresStore _POSTGRES_SAFE_CLASSES UnstorableBlock
        is_data_error describe_error PredictionBlock block_key without_logged write_blocks
        log_store REJECTION_COLUMNS _REJECTION_KEY _SQLITE_REJECTIONS _SQLITE_INSERT_REJECTIONS _POSTGRES_REJECTIONS
        _POSTGRES_INSERT_REJECTIONS latest_totals""",
    "reader": """PREDICTION_COLUMNS _prediction_frame _event_times _with_features _block_frame PredictionReader
        SHADOW_PREFIX shadow_request_id SHADOW_PAIR_COLUMNS pair_shadow shadow_pairs shadow_summary read_rejections""",
    "writer": """_id_text pseudonymize ID_KEY_ENV _create_key id_key _FIELD_HELP _CONVERSION_ERRORS _id_hasher _text_id
        _invalid prediction_row label_row JournalError Journal journal_folder replay_journals _logger _transaction
        _weight _Wake PredictionLog open_log
        _PENDING_COLUMNS _BLOCK_COLUMNS _delete_run _publish_blocks PendingRun remove_dead_runs
        _REASON_CODE _FIELD_NAME hour_text RejectionTally journal_rejections""",
}
NAMES = {name: part for part, names in NAMES.items() for name in names.split()}
# PredictionLog's methods: those that only read the store move to `PredictionReader`, which PredictionLog extends.
READER_METHODS = {"count", "has_prediction", "predictions", "labels", "rejections"}
WRITER_METHODS = {"__init__", "__repr__", "__enter__", "__exit__", "_create_tables", "record", "_tend_journals",
                  "record_many", "_record_many_as_rows", "record_label", "_enqueue", "when_committed",
                  "_release_waiters", "pending", "errors", "flush", "close", "discard", "_note", "_ensure_writer",
                  "_run", "_take", "_write_until_stopped", "_write_rows_alone", "_write", "_drop_connection",
                  "record_rejections"}
IMPORTS_CELL = "a1f0c004"  # the module's imports: each part keeps those it uses
SETUP_CELLS = {"a1f0c005"}  # the checks' setup (temporary folder, test helpers): copied to every part
CELL_PARTS = {  # cells placed by hand: markdown that introduces what follows, or cells the names cannot place
    "a1f0c026": "writer",  # "## The log": PredictionLog
    "a1f0c029": "writer",  # the round trip
    "c45fe862": "writer",  # event times: a log written before they existed
}
OVERVIEW_CELLS = {"a1f0c001", "a1f0c003"}  # the title and the introduction stay on the package's page

TITLES = {
    "stores": ("# predlog.stores", "Where the prediction log lives and the two databases that hold it (SQLite in WAL "
               "mode, PostgreSQL): their tables, one transaction a batch, bulk predictions as Parquet blocks, and "
               "error lines that never quote a value."),
    "reader": ("# predlog.reader", "The committed predictions and labels, read from a store as frames: rows and "
               "Parquet blocks alike, features as columns, oldest first."),
    "writer": ("# predlog.writer", "Writing the prediction log: identifiers pseudonymized by a keyed hash, rows checked "
               "on the caller's thread, the journal that survives kill -9, and the queue a background thread writes "
               "in batches; `open_log` opens a project's log."),
}
READER_CLASS_HEAD = '''class PredictionReader:
    "The committed predictions and labels of one store, as monitoring, the dashboard and retraining read them."

    def __init__(self,
        store,  # the database: a `SQLiteStore` or a `PostgresStore`
    ):
        self.store = store
'''
READER_MARKDOWN = """## Reading the log

`PredictionReader` reads what the writer committed, from any store: `count` adds the predictions stored as rows
and those stored in blocks, `predictions` returns both as one frame (the features as columns, oldest first), and
`labels` the labels that arrived. A `PredictionLog` is a `PredictionReader` too. Below, a store written by hand
(two rows, one block of two predictions, a label) is read back."""
READER_CHECK = '''_store = SQLiteStore(_tmp / "read.sqlite")
_connection = _store.connect()
_store.create(_connection)
_rows = [("r1", "2024-05-01T12:00:00.000000+00:00", 1, "online", 0.25, 0, None, '{"age": 61.0}', "2024-05-01T11:00:00.000000+00:00"),
         ("r2", "2024-05-01T12:00:01.000000+00:00", 1, "online", 0.75, 1, "ab", '{"age": null}', "2024-05-01T12:00:01.000000+00:00")]
import pyarrow as pa
_table = pa.table({"request_id": ["b1", "b2"], "score": [0.5, 0.9], "decision": [0, 1], "id_hash": pa.array([None, None], pa.string()),
                   "features": pa.StructArray.from_arrays([pa.array([40.0, 50.0])], names=["age"])})
_store.write(_connection, _rows, [("r2", 1, "2024-05-02T00:00:00.000000+00:00", "2024-05-02T00:00:01.000000+00:00")],
             [PredictionBlock(_table, "2024-05-01T13:00:00.000000+00:00", 2, "batch").row()])
_connection.close()
_reader = PredictionReader(_store)
test_eq(_reader.count(), 4)
test_eq(_reader.count("batch"), 2)
test_eq(_reader.has_prediction("r1"), True)
test_eq(_reader.has_prediction("b1"), False)  # blocks are not searched
_read = _reader.predictions()
test_eq(list(_read["request_id"]), ["r1", "r2", "b1", "b2"])
test_eq(list(_read.columns), list(PREDICTION_COLUMNS) + ["age"])
test_eq(list(_read["model_version"]), [1, 1, 2, 2])
test_eq(str(_read["event_time"][0]), "2024-05-01 11:00:00+00:00")
test_eq(str(_read["event_time"][2]), "2024-05-01 13:00:00+00:00")  # a block without event times: the time it was logged
test_eq(list(_reader.predictions(limit=2)["request_id"]), ["b1", "b2"])
test_eq(list(_reader.predictions(since="2024-05-01T12:00:01Z")["request_id"]), ["r2", "b1", "b2"])
test_eq(_reader.labels()[["request_id", "label"]].values.tolist(), [["r2", 1]])'''
OVERVIEW_CHECK = '''import lifecycle.serving.predlog as predlog
from lifecycle.serving.predlog import reader, stores, writer
for _part in (stores, reader, writer):  # every public name of the three parts is here, the very same object
    for _name in _part.__all__:
        assert getattr(predlog, _name) is getattr(_part, _name), f"{_part.__name__}.{_name} is not in lifecycle.serving.predlog"
assert set(predlog.__all__) == set(stores.__all__) | set(reader.__all__) | set(writer.__all__)
assert issubclass(predlog.PredictionLog, predlog.PredictionReader)'''
STORES_BLOCKS_CHECK = '''# a block scored again is stored once: a later block keeps only the predictions no logged block holds
import pyarrow as pa
def _block(ids):
    return PredictionBlock(pa.table({"request_id": ids, "score": [0.5] * len(ids), "decision": [1] * len(ids),
                                     "id_hash": pa.array([None] * len(ids), pa.string()),
                                     "features": pa.StructArray.from_arrays([pa.array([1.0] * len(ids))], names=["age"])}),
                           utc_text("2024-05-01T12:00:00Z"), 1, "batch").row()
test_eq(block_key(pa.array(["b", "a", "c"]))[1:], ("a", "c"))
_blocks = SQLiteStore(_tmp / "blocks.sqlite")
_connection = _blocks.connect()
_blocks.create(_connection)
_blocks.write(_connection, [], [], [_block(["a", "b"])])
_blocks.write(_connection, [], [], [_block(["b", "c"])])  # b again: only c is new
test_eq(_blocks.read("SELECT count(*), sum(row_count) FROM prediction_blocks"), [(2, 3)])
_blocks.write(_connection, [], [], [_block(["c", "a"])])  # nothing new: no block
test_eq(_blocks.read("SELECT count(*), sum(row_count) FROM prediction_blocks"), [(2, 3)])
_connection.close()'''
OVERVIEW_MARKDOWN = """The log is three modules, bottom to top: `stores` (where the log lives, SQLite and PostgreSQL, the
Parquet blocks of bulk predictions, error lines without values), `reader` (the committed predictions and labels
as frames) and `writer` (pseudonymized identifiers, rows checked on the caller's thread, the journal, the queue and
its writer thread, `open_log`). This package gives their public names in one place:
`from lifecycle.serving.predlog import open_log`."""


class LayoutError(Exception):
    "The layout cannot be applied as it stands: the message says what to add to the tables above."


# --- notebooks as JSON -----------------------------------------------------------------------------------

def read_notebook(path: Path) -> dict:
    return json.loads(path.read_text())


def notebook_text(notebook: dict) -> str:
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def lines_of(text: str) -> list[str]:
    return text.splitlines(keepends=True) if text else []


def new_cell(kind: str, text: str, cell_id: str) -> dict:
    text = text.rstrip("\n")
    cell = {"cell_type": kind, "id": cell_id, "metadata": {}, "source": lines_of(text)}
    if kind == "code":
        cell = {"cell_type": "code", "execution_count": None, "id": cell_id, "metadata": {}, "outputs": [], "source": lines_of(text)}
    return cell


def default_exp(notebook: dict) -> str | None:
    for cell in notebook["cells"]:
        match = re.search(r"^#\|\s*default_exp\s+(\S+)", source(cell), re.M)
        if match and cell["cell_type"] == "code":
            return match.group(1)
    return None


def set_default_exp(notebook: dict, module: str) -> None:
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code" and re.search(r"^#\|\s*default_exp\s+\S+", source(cell), re.M):
            cell["source"] = lines_of(re.sub(r"^(#\|\s*default_exp\s+)\S+", lambda m: m.group(1) + module, source(cell), count=1, flags=re.M))
            return
    raise LayoutError(f"no default_exp cell in the notebook for {module}")


def python_of(text: str) -> str:
    "A cell's code with magics and shell lines blanked, so that ast can read it."
    return "".join("\n" if line.lstrip().startswith(("%", "!")) else line for line in lines_of(text))


def is_export(cell: dict) -> bool:
    return cell["cell_type"] == "code" and re.search(r"^#\|\s*export\s*$", source(cell), re.M) is not None


def defined_names(tree: ast.AST) -> set[str]:
    "Names a module-level statement (or several) binds."
    found = set()
    for node in (tree.body if isinstance(tree, ast.Module) else [tree]):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                found |= {name.id for name in ast.walk(target) if isinstance(name, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, (ast.For, ast.With, ast.If, ast.Try)):
            found |= {name.id for name in ast.walk(node) if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Store)}
    return found


def used_names(text: str) -> set[str]:
    return {node.id for node in ast.walk(ast.parse(python_of(text))) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


# --- splitting the prediction log ---------------------------------------------------------------------------

def pieces(text: str) -> list[tuple[str, set[str], ast.AST | None, int]]:
    """An exported cell's code cut before each top-level statement (with its decorators and the comments right above
    it): (code, names it binds, its statement, the line the code starts at)."""
    lines = lines_of(text)
    tree = ast.parse(python_of(text))
    starts = []
    for node in tree.body:
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        while start > 0 and lines[start - 1].lstrip().startswith("#") and not lines[start - 1].startswith("#|"):
            start -= 1
        starts.append(start)
    if not starts:
        return [(text, set(), None, 0)]
    starts[0] = 0
    cut = starts + [len(lines)]
    return [("".join(lines[cut[i]:cut[i + 1]]), defined_names(node), node, cut[i]) for i, node in enumerate(tree.body)]


def without_directives(text: str) -> str:
    return "".join(line for line in lines_of(text) if not re.match(r"#\|\s*export\s*$", line)).strip("\n") + "\n"


def split_prediction_log_class(text: str, node: ast.ClassDef, offset: int) -> tuple[str, str]:
    "PredictionLog's code (`text`, from line `offset` of its cell) without its reading methods, and `PredictionReader` made of them."
    lines = [""] * offset + lines_of(text)
    methods = [child for child in node.body if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))]
    unknown = sorted(method.name for method in methods if method.name not in READER_METHODS | WRITER_METHODS)
    if unknown:
        raise LayoutError(f"PredictionLog methods not placed: {', '.join(unknown)}; add each to READER_METHODS (it only reads "
                          f"self.store) or WRITER_METHODS in {Path(__file__).name}")
    moved, keep = [], [True] * len(lines)
    for method in methods:
        if method.name not in READER_METHODS:
            continue
        start = min([method.lineno] + [d.lineno for d in method.decorator_list]) - 1
        while start > 0 and (lines[start - 1].strip() == "" or lines[start - 1].lstrip().startswith("#")):
            start -= 1  # the blank lines and the section comment above it go with it
        moved.append("".join(lines[start:method.end_lineno]).strip("\n") + "\n")
        for number in range(start, method.end_lineno):
            keep[number] = False
    writer = "".join(line for line, kept in zip(lines, keep) if kept)
    header = re.compile(r"^class PredictionLog\s*(\(\s*\))?\s*:", re.M)
    if not header.search(writer):
        raise LayoutError("PredictionLog is not declared as `class PredictionLog:`; extend PredictionReader by hand")
    writer = header.sub("class PredictionLog(PredictionReader):", writer, count=1)
    reader = READER_CLASS_HEAD + "\n" + "\n".join(moved)
    return writer, reader


def prune_imports(text: str, needed: set[str]) -> list[str]:
    "The statements of the imports cell `text` that bind a name in `needed` (and `from __future__`), in their order."
    kept, last = [], None
    for node in ast.parse(python_of(text)).body:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            raise LayoutError(f"the imports cell {IMPORTS_CELL} holds more than imports: {ast.unparse(node)[:60]!r}; move it")
        future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
        aliases = [alias for alias in node.names if future or (alias.asname or alias.name).split(".")[0] in needed]
        if aliases:
            if last is not None and node.lineno > last + 1 and kept:  # the cell's groups (standard, others, ours) stay apart
                kept.append("")
            node.names = aliases
            kept.append(ast.unparse(node))
        last = node.end_lineno
    return kept


def import_lines(names_by_part: dict[str, set[str]]) -> list[str]:
    "`from lifecycle.serving.predlog.<part> import …` for each part with names, wrapped as a reader would."
    lines = []  # one line a statement: nbdev makes only single-line imports relative
    for part, names in names_by_part.items():
        start, row = f"from lifecycle.serving.predlog.{part} import ", []
        for name in sorted(names, key=str.lower):
            if row and len(start) + len(", ".join(row + [name])) > 118:
                lines.append(start + ", ".join(row))
                row = []
            row.append(name)
        if row:
            lines.append(start + ", ".join(row))
    return lines


def wrapped(start: str, items: list[str], opening: str, closing: str, width: int = 118) -> str:
    "`start` and the items, on one line when it fits, else in `opening` … `closing` over indented lines."
    brackets = opening == "["  # a list keeps its brackets on one line too; an import needs no parentheses there
    line = start + (opening if brackets else "") + ", ".join(items) + (closing if brackets else "")
    if len(line) <= width:
        return line
    rows, row = [], "    "
    for item in items:
        if len(row) + len(item) + 2 > width and row.strip():
            rows.append(row.rstrip())
            row = "    "
        row += item + ", "
    rows.append(row.rstrip())
    return start + opening + "\n" + "\n".join(rows) + "\n" + closing


def split_predlog(notebook: dict) -> dict[str, dict]:
    "The prediction log's notebook as four: the package's page and its three parts (new notebooks by name)."
    placed: list[tuple[str, dict]] = []  # (part, or "overview", "imports", "setup", "markdown"; cell), in the notebook's order
    problems, reader_class = [], None
    test_globals: dict[str, str] = {}  # a name a check defines → its part
    for index, cell in enumerate(notebook["cells"]):
        cell_id, text = cell.get("id", str(index)), source(cell)
        if cell_id in OVERVIEW_CELLS or (cell["cell_type"] == "code" and re.search(r"^#\|\s*default_exp", text, re.M)):
            placed.append(("overview", cell))
        elif cell_id == IMPORTS_CELL:
            placed.append(("imports", cell))
        elif cell_id in SETUP_CELLS:
            placed.append(("setup", cell))
        elif cell["cell_type"] != "code":
            placed.append((CELL_PARTS.get(cell_id, "markdown"), cell))  # markdown: placed with the next code cell below
        elif cell_id in CELL_PARTS:
            placed.append((CELL_PARTS[cell_id], cell))
        elif is_export(cell):
            cut = pieces(text)
            owners = [{NAMES[name] for name in names if name in NAMES} for _, names, _, _ in cut]
            if any(len(owner) > 1 for owner in owners):
                problems.append(f"cell {cell_id} binds names of two parts in one statement: {sorted(next(o for o in owners if len(o) > 1))}")
                continue
            parts = [next(iter(owner), None) for owner in owners]
            for i in range(len(parts) - 1, -1, -1):  # an unplaced piece goes with the next placed piece of its cell
                if parts[i] is None and i + 1 < len(parts):
                    parts[i] = parts[i + 1]
            for i in range(len(parts)):  # or, at the end of the cell, with the one before it
                if parts[i] is None and i > 0:
                    parts[i] = parts[i - 1]
            if any(part is None for part in parts):
                names = sorted(set().union(*[names for _, names, _, _ in cut]))
                problems.append(f"exported cell {cell_id} defines {names or 'nothing'}: add its names to NAMES (or its id to CELL_PARTS)")
                continue
            groups: dict[str, list[str]] = {}
            for (piece, _, node, offset), part in zip(cut, parts):
                if isinstance(node, ast.ClassDef) and node.name == "PredictionLog":
                    piece, reader_class = split_prediction_log_class(piece, node, offset)
                groups.setdefault(part, []).append(piece)
            for number, (part, texts) in enumerate(groups.items()):
                code = "#| export\n" + without_directives("".join(texts))
                placed.append((part, new_cell("code", code, cell_id if number == 0 else f"{cell_id}-{part}")))
        else:  # a check: it goes to the highest part whose names it uses
            try:
                used = used_names(text)
            except SyntaxError:
                problems.append(f"cell {cell_id} does not parse; place it in CELL_PARTS")
                continue
            owners = {NAMES[name] for name in used if name in NAMES} | {test_globals[name] for name in used if name in test_globals}
            if not owners:
                problems.append(f"check cell {cell_id} ({text.strip().splitlines()[0][:60]!r}) uses no name of the log: place it in CELL_PARTS")
                continue
            part = max(owners, key=ORDER.index)
            foreign = sorted(name for name in used if name in test_globals and test_globals[name] != part)
            if foreign:
                problems.append(f"check cell {cell_id} goes to {part} but uses {foreign}, made by checks of another part: place both in CELL_PARTS")
                continue
            for name in defined_names(ast.parse(python_of(text))):
                test_globals.setdefault(name, part)
            placed.append((part, cell))
    if reader_class is None:
        problems.append("no class PredictionLog found: the reader cannot be made")
    if problems:
        raise LayoutError("cannot split nbs/31_predlog.ipynb:\n  " + "\n  ".join(problems))

    # cells this layout adds: a check of the blocks after them in stores; the reader class and its check in reader
    def after_last(part: str, cells: list[dict], defining: str | None = None) -> None:
        spots = [i for i, (where, cell) in enumerate(placed) if where == part and is_export(cell)
                 and (defining is None or defining in defined_names(ast.parse(python_of(source(cell)))))]
        spot = spots[-1] + 1 if spots else len(placed)
        placed[spot:spot] = [(part, cell) for cell in cells]
    after_last("stores", [new_cell("code", STORES_BLOCKS_CHECK, "blocks-check")], "write_blocks")
    after_last("reader", [new_cell("markdown", READER_MARKDOWN, "reader-md"), new_cell("code", "#| export\n" + reader_class, "reader-class"),
                          new_cell("code", READER_CHECK, "reader-check")])

    # markdown goes with the code cell that follows it (the last ones with the cell before them)
    resolved = [part for part, _ in placed]
    following = None
    for i in range(len(resolved) - 1, -1, -1):
        if resolved[i] in ORDER:
            following = resolved[i]
        elif resolved[i] == "markdown":
            resolved[i] = following or next(part for part in reversed(resolved[:i]) if part in ORDER)

    # each part's cells, the names it defines and the names it uses
    by_part = {part: [cell for (_, cell), where in zip(placed, resolved) if where == part] for part in ORDER}
    defines = {part: set() for part in ORDER}
    for part in ORDER:
        for cell in by_part[part]:
            if is_export(cell):
                defines[part] |= defined_names(ast.parse(python_of(source(cell))))
    imports_cell = next(cell for where, cell in placed if where == "imports")
    setup_cells = [cell for where, cell in placed if where == "setup"]
    setup_names = set().union(*[defined_names(ast.parse(python_of(source(cell)))) for cell in setup_cells])
    result = {}
    for part in ORDER:
        exported = "".join(python_of(source(cell)) + "\n" for cell in by_part[part] if is_export(cell))
        checks = "".join(python_of(source(cell)) + "\n" for cell in by_part[part] if cell["cell_type"] == "code" and not is_export(cell))
        uses_exported, uses_checks = used_names(exported), used_names(checks)
        cross, cross_checks, wrong = {}, {}, []
        for other in ORDER:
            if other == part:
                continue
            names = (uses_exported & defines[other]) - defines[part]
            check_names = (uses_checks & defines[other]) - defines[part] - names - setup_names
            if ORDER.index(other) > ORDER.index(part) and (names or check_names):
                wrong.append(f"{part} uses {sorted(names | check_names)} of {other}, a part above it")
            cross[other], cross_checks[other] = names, check_names
        if wrong:
            raise LayoutError("cannot split nbs/31_predlog.ipynb:\n  " + "\n  ".join(wrong) + "\n  move those cells with NAMES or CELL_PARTS")
        imports = "#| export\n" + "".join(line + "\n" for line in prune_imports(source(imports_cell), uses_exported) + import_lines(cross))
        setup_uses = used_names("".join(python_of(source(cell)) + "\n" for cell in setup_cells))
        bound = defined_names(ast.parse(python_of(imports))) | setup_names
        check_imports = [line for line in prune_imports(source(imports_cell), (uses_checks | setup_uses) - bound)
                         if line and not line.startswith("from __future__")]
        title, summary = TITLES[part]
        head = [new_cell("markdown", f"{title}\n\n> {summary}", f"{part}-title"),
                new_cell("code", f"#| default_exp serving.predlog.{part}", f"{part}-exp"),
                new_cell("code", imports, IMPORTS_CELL)]
        extra = "".join(line + "\n" for line in check_imports + import_lines(cross_checks))  # what only the checks use
        head += [dict(cell, source=lines_of(extra + source(cell))) if number == 0 else cell for number, cell in enumerate(setup_cells)]
        result[PARTS[part]] = dict(notebook, cells=head + by_part[part])

    # the package's page: the title, the introduction, and the public names of the three parts
    public = {part: sorted((name for name in defines[part] if not name.startswith("_")), key=str.lower) for part in ORDER}
    facade = "#| export\n" + "".join(line + "\n" for line in import_lines({part: set(names) for part, names in public.items()}))
    facade += "\n" + wrapped("_all_ = ", [repr(name) for part in ORDER for name in public[part]], "[", "]") + "\n"
    overview = [cell for where, cell in placed if where == "overview"]
    set_default_exp({"cells": overview}, "serving.predlog.__init__")
    overview += [new_cell("markdown", OVERVIEW_MARKDOWN, "predlog-parts"), new_cell("code", facade, "predlog-names"),
                 new_cell("code", OVERVIEW_CHECK, "predlog-names-check")]
    result[PREDLOG] = dict(notebook, cells=overview)
    return result


# --- references -----------------------------------------------------------------------------------------------

MODULE_REFERENCE = re.compile(r"\blifecycle\.(" + "|".join(SERVING) + r")\b(?!-)")
FROM_PACKAGE = re.compile(r"\bfrom lifecycle import (" + "|".join(SERVING) + r")\b(?!\s*,)")
MIXED_FROM_PACKAGE = re.compile(r"\bfrom lifecycle import [^\n]*\b(" + "|".join(SERVING) + r")\b")
NOTEBOOK_REFERENCE = re.compile(r"\b(" + "|".join(RENAMES) + r")\b")


def rewrite_references(text: str, where: str) -> str:
    text = MODULE_REFERENCE.sub(lambda m: f"lifecycle.serving.{m.group(1)}", text)
    text = FROM_PACKAGE.sub(lambda m: f"from lifecycle.serving import {m.group(1)}", text)
    mixed = [line for line in text.splitlines() if MIXED_FROM_PACKAGE.search(line) and "lifecycle.serving" not in line]
    if mixed:
        raise LayoutError(f"{where}: split this import by hand (serving modules beside others): {mixed[0].strip()}")
    return NOTEBOOK_REFERENCE.sub(lambda m: RENAMES[m.group(1)], text)


def rewrite_notebook_references(notebook: dict, where: str) -> dict:
    for cell in notebook["cells"]:
        text = source(cell)
        new = rewrite_references(text, where)
        if new != text:
            cell["source"] = lines_of(new)
    return notebook


README_LAYOUT = ("scoring (`30_scoring`), prediction log (`31_predlog`), ",
                 "and the serving side, the subpackage `lifecycle.serving`: scoring (`30_scoring`), prediction log (`31_predlog`, in "
                 "three parts: its stores `32_predlog_stores`, reader `33_predlog_reader` and writer `34_predlog_writer`), ")
README_PACKAGE = ("| `lifecycle/` | the package, generated from `nbs/` by `nbdev-export`; never edited by hand |",
                  "| `lifecycle/` | the package, generated from `nbs/` by `nbdev-export`; never edited by hand. The serving side is "
                  "the subpackage `lifecycle/serving/` (scoring, the prediction log `predlog/` with its `stores`, `reader` and "
                  "`writer`, the server, batch, stream, replay); `tests/test_layers.py` holds the layers |")
PYPROJECT_PACKAGES = ('packages = ["lifecycle", "lifecycle.nbs"]',
                      'packages = ["lifecycle", "lifecycle.serving", "lifecycle.serving.predlog", "lifecycle.nbs"]')
WHEEL_CHECK = ('    assert "lifecycle/pipeline.py" in names\n',
               '    assert "lifecycle/pipeline.py" in names\n'
               '    assert "lifecycle/serving/predlog/writer.py" in names and "lifecycle/serving/serve.py" in names  # the subpackages\n')

# tests/test_imports.py: every module, those of the subpackages too
IMPORTS_EDITS = [
    ('MODULES = sorted(f"lifecycle.{module.name}" for module in pkgutil.iter_modules(lifecycle.__path__) if module.name != "_modidx")',
     'FOLDER = Path(lifecycle.__file__).resolve().parent\n'
     'MODULES = sorted(".".join(("lifecycle",) + path.relative_to(FOLDER).with_suffix("").parts[:-1 if path.name == "__init__.py" else None])\n'
     '                 for path in FOLDER.rglob("*.py") if path.name != "_modidx.py" and path != FOLDER / "__init__.py")\n\n\n'
     'def module_file(module: str) -> Path:\n'
     '    "The source file of a module of the package: `lifecycle.serving.predlog` is `lifecycle/serving/predlog/__init__.py`."\n'
     '    path = FOLDER.joinpath(*module.split(".")[1:])\n'
     '    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")'),
    ('tree = ast.parse(Path(lifecycle.__file__).with_name(module.split(".")[1] + ".py").read_text())',
     'tree = ast.parse(module_file(module).read_text())'),
]

# tests/test_layers.py: the modules are named by their path in the package (`serving.predlog.writer`)
SERVING_LAYERS = """    # the serving side, the subpackage lifecycle.serving: scoring and the prediction log (its parts, bottom to top:
    # stores, reader, writer) are shared services; the server, batch, stream and replay sit beside the stages
    "serving": {predlog}, "serving.scoring": {scoring}, "serving.predlog": {predlog}, "serving.predlog.stores": {predlog},
    "serving.predlog.reader": {predlog}, "serving.predlog.writer": {predlog},
    "serving.serve": {serve}, "serving.batch": {batch}, "serving.stream": {stream}, "serving.replay": {replay},
"""
LAYERS_INSIDE = '''# Inside a package whose parts are ordered, a part imports only the parts before it.
ORDERED = [["serving.predlog.stores", "serving.predlog.reader", "serving.predlog.writer"]]
'''
IMPORTED_MODULES = '''def imported_modules(source: str, module: str = "", package: str = "lifecycle") -> set[str]:
    """The package's modules a module's source imports, anywhere in it (at its top or inside a function), named by their
    path in the package (`serving.predlog`); `module` (`serving.batch`) resolves its relative imports."""
    here = [package] + module.split(".")[:-1] if module else [package]  # the package the module is in
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .core import …, from ..core import …, from . import core
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}".removeprefix(f"{package}.") in LAYERS else base for alias in node.names]
        else:
            continue
        found |= {name.removeprefix(f"{package}.") for name in names if name.startswith(f"{package}.")}
    return {layer_name(name) for name in found}


def layer_name(module: str) -> str:
    "The name LAYERS knows a module by: itself, or the package it belongs to (`serving.predlog.open_log` → `serving.predlog`)."
    while module not in LAYERS and "." in module:
        module = module.rpartition(".")[0]
    return module
'''
PACKAGE_IMPORTS = '''def package_imports() -> dict[str, set[str]]:
    "Each module's imports (subpackages included, named by their path): its source's, and its notebook's run section's."
    folder = Path(lifecycle.__file__).resolve().parent
    imports = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        if path.name == "_modidx.py" or parts == ("__init__",):
            continue
        module = ".".join(parts[:-1] if path.name == "__init__.py" else parts)
        imports[module] = imported_modules(path.read_text(), module if path.name != "__init__.py" else f"{module}.__init__")
    notebooks = folder.parent / "nbs"
    for notebook in sorted(notebooks.glob("*.ipynb")):
        module, code = run_section_code(notebook)
        if module in imports:
            imports[module] |= imported_modules(code, module)
    return imports
'''
VIOLATION_INSIDE = ('''            elif module in STAGES and target in STAGES:
                found.append(f"{module} -> {target}: a stage imports another stage")
''', '''            elif module in STAGES and target in STAGES:
                found.append(f"{module} -> {target}: a stage imports another stage")
            elif any(module in parts and target in parts and parts.index(target) > parts.index(module) for parts in ORDERED):
                found.append(f"{module} -> {target}: a part of the package imports a part above it")
''')
CASES = [('("scoring", "from .bench import measure\\n", ["scoring -> bench"]),',
          '("serving.scoring", "from ..bench import measure\\n", ["serving.scoring -> bench"]),  # relative, from a subpackage'),
         ('("stream", "from lifecycle import cli\\n", ["stream -> cli"]),',
          '("serving.stream", "from lifecycle import cli\\n", ["serving.stream -> cli"]),'),
         ('("deploy", "from lifecycle.serve import create_app\\nfrom lifecycle.sources import read_source\\n", []),',
          '("deploy", "from lifecycle.serving.serve import create_app\\nfrom lifecycle.sources import read_source\\n", []),\n'
          '    ("serving.predlog.stores", "from .writer import open_log\\n", ["serving.predlog.stores -> serving.predlog.writer"]),\n'
          '    ("serving.batch", "from .predlog import open_log\\nfrom ..core import LifecycleError\\n", []),\n'
          '    ("serving.scoring", "from lifecycle.serving.predlog import open_log\\n", []),  # a package, by its __init__\n'
          '    ("metrics", "from lifecycle.serving import batch\\n", ["metrics -> serving.batch"]),'),
         ('found = violations({module: imported_modules(source)})', 'found = violations({module: imported_modules(source, module)})')]


def replace_function(text: str, name: str, new: str, where: str) -> str:
    "Replace the top-level function `name` of `text` by `new`."
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            lines = lines_of(text)
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            return "".join(lines[:start]) + new + "".join(lines[node.end_lineno:])
    raise LayoutError(f"{where}: no function {name}")


def edit_once(text: str, old: str, new: str, where: str, required: bool = True) -> str:
    "Replace `old` by `new` once; already done (new present, old gone) is fine."
    if new in text and (old not in text or old in new):
        return text
    if old not in text:
        if required:
            raise LayoutError(f"{where}: cannot find the text to change: {old.strip()[:80]!r}; edit it by hand")
        print(f"note: {where}: left as it is (no {old.strip()[:60]!r})")
        return text
    return text.replace(old, new, 1)


def layers_test(text: str, where: str) -> str:
    if "def layer_name" in text:
        return text  # done
    start = text.index("LAYERS = {")
    end = text.index("\n}\n", start) + 1
    table = text[start:end]
    layers = {}
    for module in SERVING:
        match = re.search(rf'"{module}": (\d+),? ?', table)
        if not match:
            raise LayoutError(f"{where}: LAYERS has no {module!r}; edit it by hand")
        layers[module] = match.group(1)
        table = table[:match.start()] + table[match.end():]
    table = table.replace("# the stages, and the serving parts\n", "# the stages, the dashboard and its server\n")
    table = re.sub(r"[ \t]+\n", "\n", table)
    table = "\n".join(line for line in table.split("\n") if line.strip() != "")  # a line the moves emptied
    lines = table.split("\n")
    spot = next((i for i, line in enumerate(lines) if line.strip().startswith("# the runner")), len(lines))
    lines[spot:spot] = SERVING_LAYERS.format(**layers).rstrip("\n").split("\n")
    text = text[:start] + "\n".join(lines) + "\n" + text[end:]
    text = edit_once(text, "STAGES = {", LAYERS_INSIDE + "STAGES = {", where)
    text = replace_function(text, "imported_modules", IMPORTED_MODULES, where)
    text = replace_function(text, "package_imports", PACKAGE_IMPORTS, where)
    text = edit_once(text, *VIOLATION_INSIDE, where)
    for old, new in CASES:
        text = edit_once(text, old, new, where)
    return without_unused_pkgutil(text)


def without_unused_pkgutil(text: str) -> str:
    return text.replace("import pkgutil\n", "", 1) if "pkgutil." not in text else text


# --- the whole change ---------------------------------------------------------------------------------------------

TEXT_FILES = ["README.md", "Makefile", "settings.ini", "pyproject.toml", "Dockerfile"]
TEXT_FOLDERS = ["tests", "docs", ".ci", ".github"]
TEXT_SUFFIXES = {".py", ".md", ".ini", ".toml", ".yml", ".yaml", ".txt", ".cfg", ".sh", ""}


def plan() -> tuple[dict[Path, str], list[Path]]:
    "Every file's new text, and the files to delete; nothing is written."
    writes: dict[Path, str] = {}
    deletes: list[Path] = []
    notebooks = {path.stem: read_notebook(path) for path in sorted(NBS.glob("*.ipynb"))}
    for old, new in RENAMES.items():
        if old in notebooks and new in notebooks:
            raise LayoutError(f"both nbs/{old}.ipynb and nbs/{new}.ipynb exist: merge them by hand first")
        if old in notebooks:
            notebooks[new] = notebooks.pop(old)
            deletes.append(NBS / f"{old}.ipynb")
    if PREDLOG in notebooks and default_exp(notebooks[PREDLOG]) == "predlog":
        if any(name in notebooks for name in PARTS.values()):
            raise LayoutError(f"nbs/{PREDLOG}.ipynb is not split yet but one of {list(PARTS.values())} exists")
        notebooks.update(split_predlog(notebooks[PREDLOG]))
    for name, module in MODULES.items():
        if name not in notebooks:
            raise LayoutError(f"nbs/{name}.ipynb is missing")
        if default_exp(notebooks[name]) != module:
            set_default_exp(notebooks[name], module)
    for name, notebook in notebooks.items():
        rewrite_notebook_references(notebook, f"nbs/{name}.ipynb")
        writes[NBS / f"{name}.ipynb"] = notebook_text(notebook)
    files = [ROOT / name for name in TEXT_FILES if (ROOT / name).exists()]
    for folder in TEXT_FOLDERS:
        files += sorted(path for path in (ROOT / folder).rglob("*") if path.is_file() and path.suffix in TEXT_SUFFIXES
                        and "__pycache__" not in path.parts)
    for path in files:
        where = str(path.relative_to(ROOT))
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        new = text
        if path.name == "serving_layout.py":
            continue
        if path == ROOT / "tests" / "test_layers.py":
            new = layers_test(new, where)
        else:
            new = rewrite_references(new, where)
        if path == ROOT / "tests" / "test_imports.py":
            for old, replacement in IMPORTS_EDITS:
                new = edit_once(new, old, replacement, where)
            new = without_unused_pkgutil(new)
        if path == ROOT / "pyproject.toml":
            new = edit_once(new, *PYPROJECT_PACKAGES, where)
        if path == ROOT / "README.md":
            new = edit_once(new, *README_LAYOUT, where, required=False)
            new = edit_once(new, *README_PACKAGE, where, required=False)
        if path == ROOT / "tests" / "test_default_project.py":
            new = edit_once(new, *WHEEL_CHECK, where, required=False)
        writes[path] = new
    # the facade re-exports: every `from lifecycle.serving.predlog import …` must find its names there
    facade = notebooks.get(PREDLOG)
    exported = set()
    if facade is not None:
        for cell in facade["cells"]:
            if is_export(cell):
                exported |= defined_names(ast.parse(python_of(source(cell))))
    missing = set()
    for path, text in writes.items():
        for match in re.finditer(r"from lifecycle\.serving\.predlog import (\([^)]*\)|[^\n\\#]+)", text):
            names = {re.match(r"\s*(\w*)", name).group(1) for name in match.group(1).strip("()").split(",")}
            missing |= names - exported - {""}
    missing -= {"stores", "reader", "writer"}
    if missing:
        raise LayoutError(f"imported from lifecycle.serving.predlog but not public in its parts: {sorted(missing)}; "
                          "import them from their part (lifecycle.serving.predlog.writer …)")
    for module in SERVING:  # the old generated modules; nbdev-export writes the new ones
        path = ROOT / "lifecycle" / f"{module}.py"
        if path.exists():
            deletes.append(path)
    return writes, deletes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say what would change; exit 1 if anything would")
    args = parser.parse_args(argv)
    try:
        writes, deletes = plan()
    except LayoutError as error:
        print(f"serving_layout: {error}", file=sys.stderr)
        return 2
    changed = [path for path, text in writes.items() if not path.exists() or path.read_text() != text]
    for path in changed:
        print(("would write " if args.check else "write ") + str(path.relative_to(ROOT)))
    for path in deletes:
        print(("would delete " if args.check else "delete ") + str(path.relative_to(ROOT)))
    if args.check:
        return 1 if changed or deletes else 0
    for path in changed:
        path.write_text(writes[path])
    for path in deletes:
        path.unlink()
    if changed or deletes:
        print("now run: .venv/bin/nbdev-clean && .venv/bin/nbdev-export")
    else:
        print("nothing to change: the layout is in place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
