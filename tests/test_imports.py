"Importing lifecycle changes no global setting: pandas, Arrow, numpy, logging, warnings, signal handlers, environment."

import ast
import json
import subprocess
import sys
from pathlib import Path

import lifecycle

FOLDER = Path(lifecycle.__file__).resolve().parent
MODULES = sorted(
    ".".join(
        ("lifecycle",) + path.relative_to(FOLDER).with_suffix("").parts[: -1 if path.name == "__init__.py" else None]
    )
    for path in FOLDER.rglob("*.py")
    if path.name != "_modidx.py" and path != FOLDER / "__init__.py"
)


def module_file(module: str) -> Path:
    """The source file of a module of the package: `lifecycle.serving.predlog` is
    `lifecycle/serving/predlog/__init__.py`."""
    path = FOLDER.joinpath(*module.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def dependencies() -> list[str]:
    """The other packages' modules lifecycle's modules import at their top: they are imported before the "before",
    so that what is compared is what lifecycle itself does (scikit-learn, for one, sets warnings filters and
    environment variables when it is imported, as it does in a user's notebook that imports it)."""
    found = set()
    for module in MODULES:
        tree = ast.parse(module_file(module).read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
                found.add(node.module)
    return sorted(name for name in found if name.split(".")[0] != "lifecycle")


# Runs in a fresh interpreter: the settings a user's notebook has after importing pandas, pyarrow and numpy,
# then after importing each lifecycle module in turn.
PROBE = r"""
import json, logging, os, signal, sys, warnings
import numpy as np
import pandas as pd
import pyarrow as pa

def pandas_options():
    from pandas._config import config
    return {key: repr(pd.get_option(key)) for key in sorted(config._registered_options)}

def loggers():
    known = {"": logging.getLogger()} | {name: logger for name, logger in logging.root.manager.loggerDict.items()
                                          if isinstance(logger, logging.Logger)}
    return {name: [logger.level, logger.disabled, logger.propagate, [type(h).__name__ for h in logger.handlers]]
            for name, logger in known.items()}

def settings():
    return {
        "pandas": pandas_options(),
        "arrow": {
            "memory pool": pa.default_memory_pool().backend_name,
            "cpu count": pa.cpu_count(),
            "io threads": pa.io_thread_count(),
        },
        "numpy": {"errors": np.geterr(), "print": {k: repr(v) for k, v in np.get_printoptions().items()}},
        "logging": {"disable": logging.root.manager.disable, "loggers": loggers()},
        "warnings": [repr(f) for f in warnings.filters],
        "signals": {name: repr(signal.getsignal(getattr(signal, name))) for name in ("SIGINT", "SIGTERM", "SIGHUP")},
        "environment": dict(os.environ),
    }

def changes(before, after):
    found = []
    for part in before:
        if part in ("pandas", "logging"):  # new options and loggers are no change; what existed must stay as it was
            old = before[part] if part == "pandas" else before[part]["loggers"]
            new = after[part] if part == "pandas" else after[part]["loggers"]
            found += [f"{part} {key}: {old[key]} -> {new.get(key)}" for key in old if new.get(key) != old[key]]
            if part == "logging" and before[part]["disable"] != after[part]["disable"]:
                found.append("logging.disable")
        elif part == "environment":
            keys = set(before[part]) | set(after[part])
            found += [f"environment {key}" for key in keys if before[part].get(key) != after[part].get(key)]
        elif before[part] != after[part]:
            found.append(f"{part}: {before[part]} -> {after[part]}")
    return found

import importlib
modules, dependencies = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for module in dependencies:
    importlib.import_module(module)
before = settings()
report = {}
for module in modules:
    importlib.import_module(module)
    report[module] = changes(before, settings())
print(json.dumps(report))
"""


def test_importing_lifecycle_changes_no_global_setting():
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(MODULES), json.dumps(dependencies())],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(lifecycle.__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(report) == MODULES
    first = next(((module, found) for module, found in report.items() if found), None)
    assert first is None, f"importing {first[0]} changed: {first[1]}"


def test_the_probe_sees_a_change():
    "The probe notices each kind of change it looks for (a test that could not fail would prove nothing)."
    code = PROBE.replace("    importlib.import_module(module)\n    report", "    exec(module)\n    report")
    assert code.count("exec(module)") == 1
    changes = [
        "import pandas as pd; pd.set_option('mode.copy_on_write', True)",
        "import pyarrow as pa; pa.set_memory_pool(pa.system_memory_pool())",
        "import numpy as np; np.seterr(all='ignore')",
        "import logging; logging.basicConfig(level=logging.INFO)",
        "import warnings; warnings.simplefilter('ignore')",
        "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)",
        "import os; os.environ['OMP_NUM_THREADS'] = '7'",
    ]
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(changes), "[]"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert [bool(found) for found in report.values()] == [True] * len(changes), report
