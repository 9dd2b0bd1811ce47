"""Rooms a newcomer can read: no module over about 600 lines, no function over 60 without the reason in its docstring,
and an import inside a function says why it is not at the top (an optional dependency, start-up time) beside it."""

import ast
from pathlib import Path

import pytest

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
