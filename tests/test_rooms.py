"""Rooms a newcomer can read: no module over about 600 lines, no function over 60 without the reason in its docstring,
and an import inside a function says why it is not at the top (an optional dependency, start-up time) beside it."""

import ast
import importlib
import inspect
import io
import json
import textwrap
import tokenize
from pathlib import Path

import pytest
from fastcore.docments import docments

import lifecycle

PACKAGE = Path(lifecycle.__file__).resolve().parent
MODULE_LINES = 650  # "about 600"
FUNCTION_LINES = 60
REASON = "Long because"  # how a long function's docstring starts the sentence that says why


def modules() -> list[Path]:
    "The package's generated modules, but nbdev's index of them."
    return [path for path in sorted(PACKAGE.rglob("*.py")) if path.name != "_modidx.py"]


def long_functions(source: str) -> list[tuple[str, int]]:
    "Functions and methods (nested ones too) over FUNCTION_LINES lines whose docstring does not say why: (name, lines)."
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > FUNCTION_LINES and REASON not in (ast.get_docstring(node) or ""):
                found.append((node.name, lines))
    return found


def silent_inner_imports(source: str) -> list[int]:
    """Line numbers of imports inside a function or class with no comment on their lines or the line above; a run of
    imports one after the other shares the comment of its first."""
    lines = source.splitlines()
    inner = set()
    for parent in ast.walk(ast.parse(source)):
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            inner |= {
                (node.lineno, node.end_lineno)
                for node in ast.walk(parent)
                if isinstance(node, (ast.Import, ast.ImportFrom))
            }
    found, explained_until = [], None
    for start, end in sorted(inner):
        said = any("#" in line for line in lines[start - 2 : end])
        if said or explained_until == start - 1:
            explained_until = end
        else:
            found.append(start)
    return found


def test_the_checks_catch_what_they_say():
    body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_LINES))
    assert long_functions(f"def f():\n{body}\n") == [("f", FUNCTION_LINES + 1)]
    assert long_functions(f'def f():\n    "{REASON}: one table."\n{body}\n') == []
    assert silent_inner_imports("import os\n\ndef f():\n    import json\n    return json\n") == [4]
    assert silent_inner_imports("def f():\n    import torch  # optional: only for the deep model\n") == []
    assert silent_inner_imports("def f():\n    import a  # start-up time\n    import b\n\n    import c\n") == [5]


@pytest.mark.parametrize("path", modules(), ids=lambda path: path.relative_to(PACKAGE).as_posix())
def test_a_module_is_a_room(path):
    source = path.read_text()
    name = path.relative_to(PACKAGE).as_posix()
    assert len(source.splitlines()) <= MODULE_LINES, f"{name}: over {MODULE_LINES} lines; split it by role"
    assert not long_functions(source), (
        f"{name}: functions over {FUNCTION_LINES} lines with no '{REASON}' in their docstring: {long_functions(source)}"
    )
    assert not silent_inner_imports(source), (
        f"{name}: imports inside functions that do not say why (lines {silent_inner_imports(source)})"
    )


# Docments: a parameter's comment on its own line, as fastcore's `docments` (nbdev's show_doc) and papermill read it.
NOTEBOOKS = PACKAGE.parent / "nbs"


def export_cells(notebook: Path) -> list[str]:
    "The sources of a notebook's export cells."
    cells = json.loads(notebook.read_text())["cells"]
    sources = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
    return [source for source in sources if source.startswith("#| export")]


def split_docments(source: str) -> list[tuple[str, int]]:
    """Signatures a formatter broke, as (function, line): a comment-only line or a line starting with `|` between
    `def name(` and the body, or a parameter's annotation or default (or the return annotation) over several lines."""
    lines, found = source.splitlines(), []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for number in range(node.lineno + 1, node.body[0].lineno):
            if lines[number - 1].strip().startswith(("#", "|")):
                found.append((node.name, number))
        arguments = node.args
        parameters = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
        defaults = dict(zip(reversed(arguments.posonlyargs + arguments.args), reversed(arguments.defaults)))
        defaults |= {arg.arg: d for arg, d in zip(arguments.kwonlyargs, arguments.kw_defaults) if d is not None}
        for arg in parameters:
            ends = [part.end_lineno for part in (arg.annotation, defaults.get(arg.arg)) if part is not None]
            if any(end != arg.lineno for end in ends):
                found.append((node.name, arg.lineno))
        returns = node.returns
        if returns is not None and ("->" not in lines[returns.lineno - 1] or returns.end_lineno != returns.lineno):
            found.append((node.name, returns.lineno))
    return sorted(set(found), key=lambda item: item[1])


def comments(source: str, trailing: bool = False) -> dict[int, str]:
    "Line number -> the text of its comment; `trailing`: only comments that end a line of code."
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and (not trailing or token.line[: token.start[1]].strip()):
            found[token.start[0]] = token.string.lstrip("#").strip()
    return found


def documented_functions(module, source: str) -> list:
    "The module's own functions and its classes' methods, as objects (nested functions are left to `split_docments`)."
    found = []
    for node in ast.parse(source).body:
        owner, defs = module, [node]
        if isinstance(node, ast.ClassDef):
            owner, defs = getattr(module, node.name, None), node.body
        for item in defs:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and hasattr(owner, item.name):
                found.append(inspect.unwrap(inspect.getattr_static(owner, item.name)))
    return [function for function in found if inspect.isfunction(function)]


def docment_mismatches(function) -> list[str]:
    """The parameters (but self, cls) without a comment that ends their own line, or to which
    `fastcore.docments.docments` gives another one, in a function written one parameter a line with as many comments
    in its signature as parameters."""
    source = textwrap.dedent(inspect.getsource(function))
    node = ast.parse(source).body[0]
    arguments = node.args
    parameters = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
    parameters = [arg for arg in parameters if arg.arg not in ("self", "cls")]
    lines = [arg.lineno for arg in parameters]
    if not parameters or node.lineno in lines or len(set(lines)) < len(lines):
        return []  # a one-line signature, or parameters sharing lines: not written in docments
    end = node.returns.lineno if node.returns else node.body[0].lineno
    said = [number for number in comments(source) if node.lineno < number < end]
    if len(said) < len(parameters):
        return []  # not every parameter is documented
    trailing, got = comments(source, trailing=True), docments(function)
    return [
        arg.arg for arg in parameters if trailing.get(arg.lineno) in (None, "") or got[arg.arg] != trailing[arg.lineno]
    ]


def test_the_docment_checks_catch_what_they_say():
    split = "def f(\n    a: str\n    | None = None,  # the a\n    # the b, too long\n    b: int = 1,\n"
    split += ") -> (\n    int\n):  # the sum\n    pass\n"
    assert split_docments(split) == [("f", 2), ("f", 3), ("f", 4), ("f", 7)]
    whole = "def f(\n    a: str | None = None,  # the a\n    b: int = 1,  # the b\n) -> int:  # the sum\n    pass\n"
    assert split_docments(whole) == []
    assert comments(whole, trailing=True) == {2: "the a", 3: "the b", 4: "the sum"}
    assert docment_mismatches(_docmented) == []
    assert docment_mismatches(_comment_above) == ["b"]  # its comment is above it
    assert docment_mismatches(_split) == ["a"]  # fastcore loses a's comment
    assert docment_mismatches(_half_docmented) == []  # not every parameter has one: not judged


def _docmented(
    a: int,  # the a
    b: int = 1,  # the b
) -> int:  # their sum
    return a + b


def _comment_above(
    a: int,  # the a
    # the b, put above it by a wrapping tool
    b: int = 1,
    c: int = 2,  # the c
) -> int:
    return a + b + c


# fmt: off
def _split(
    a: int
    | None = None,  # the a
    b: int = 1,  # the b
) -> int:
    return a + b
# fmt: on


def _half_docmented(
    a: int,  # the a
    b: int = 1,
) -> int:
    return a + b


@pytest.mark.parametrize("notebook", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda path: path.stem)
def test_docments_sit_on_their_parameters_lines(notebook):
    for source in export_cells(notebook):
        assert not split_docments(source), f"{notebook.name}: signatures split over lines: {split_docments(source)}"


@pytest.mark.parametrize("path", modules(), ids=lambda path: path.relative_to(PACKAGE).as_posix())
def test_docments_gives_each_parameter_its_own_comment(path):
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    module = importlib.import_module(name)
    wrong = {
        f.__qualname__: docment_mismatches(f)
        for f in documented_functions(module, path.read_text())
        if docment_mismatches(f)
    }
    assert not wrong, f"{name}: parameters to which fastcore's docments gives another comment: {wrong}"
