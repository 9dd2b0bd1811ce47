"""Models: an alias only names a file that matches its hash and loads with our own trusted types; the list flags a file
that fails; a refused file is one line."""

import io
import json
import zipfile

import numpy as np
import pandas as pd
import pytest
import skops.io
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from lifecycle.cli import main
from lifecycle.core import LifecycleError, sha256_bytes, write_json
from lifecycle.registry import Registry, events, load_model, model_bytes, register, set_alias
from lifecycle.train import build_pipeline

META = {
    "model": "logistic_regression",
    "features": {"numeric": ["age", "chol"], "categorical": []},
    "threshold": 0.5,
    "schema": {
        "columns": {
            "age": {"kind": "numeric", "min": 1.0, "max": 120.0},
            "chol": {"kind": "numeric", "min": 80.0, "max": 700.0},
        }
    },
}


def _rows(n=200):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"age": rng.uniform(20, 80, n).round(), "chol": rng.uniform(100, 400, n).round()})
    return frame, (frame["age"] > 50).astype(int)


@pytest.fixture
def project(tmp_path):
    "A project whose registry holds two good versions, version 1 the champion."
    frame, labels = _rows()
    registry = Registry(tmp_path)
    for seed in (0, 1):
        register(registry, build_pipeline("logistic_regression", ["age", "chol"], [], seed).fit(frame, labels), META)
    set_alias(registry, "champion", 1, "first")
    (tmp_path / "settings.ini").write_text("[data]\nsources = a: in.csv\ntarget = num\npositive = 1\n")
    frame.to_csv(tmp_path / "in.csv", index=False)
    return tmp_path


def _plant(root, version, data: bytes, rehash: bool):
    "Replace a version's model file; with `rehash`, its record too (as someone who could write both would)."
    folder = Registry(root).path / "versions" / str(version)
    (folder / "model.skops").write_bytes(data)
    if rehash:
        meta = json.loads((folder / "meta.json").read_text())
        write_json(folder / "meta.json", {**meta, "sha256": sha256_bytes(data)})


def _models(root, capsys, *args):
    code = main(["models", *args, "--settings", str(root / "settings.ini")])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_promote_refuses_a_file_that_fails_its_hash_and_the_list_flags_it(project, capsys):
    path = Registry(project).path / "versions" / "2" / "model.skops"
    path.write_bytes(path.read_bytes() + b"\0")
    code, out, err = _models(project, capsys, "promote", "2")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "SHA-256 does not match" in err
    assert Registry(project).aliases() == {"champion": 1} and len(events(Registry(project))) == 1
    code, out, err = _models(project, capsys)
    assert code == 0 and "FILE FAILS ITS SHA-256" in out and "version 2" in err
    code, out, _ = _models(project, capsys, "--json")
    assert {v["version"]: v["file_ok"] for v in json.loads(out)["versions"]} == {1: True, 2: False}


def test_shadow_by_hand_of_a_version_without_a_passed_gate_needs_force_and_is_warned(project, capsys):
    from lifecycle.registry import update_meta

    code, out, err = _models(project, capsys, "shadow", "2", "--reason", "to watch it")
    assert code == 1 and "shadow" not in Registry(project).aliases()
    assert err.strip() == (
        "lifecycle: version 2 cannot become shadow: it has no gate decision (never evaluated); "
        "to promote it anyway: lifecycle models shadow 2 --force --reason '…'"
    )
    code, out, err = _models(project, capsys, "shadow", "2", "--force", "--reason", "to watch it")
    assert code == 0 and Registry(project).aliases()["shadow"] == 2
    assert (
        err.strip()
        == "warning: version 2 has not passed its gate: it scores in shadow, but lifecycle retrain will take it off, "
        "never promote it"
    )
    update_meta(Registry(project), 2, gate={"passed": True, "reasons": []})
    code, out, err = _models(project, capsys, "shadow", "2", "--reason", "evaluated now", "--json")
    assert code == 0 and err == "" and json.loads(out)["event"]["version"] == 2


def test_promote_refuses_a_file_that_does_not_load(project, capsys):
    _plant(project, 2, b"PK\x03\x04 this is not a zip archive", rehash=True)
    code, _, err = _models(project, capsys, "promote", "2")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "not a model file" in err
    assert Registry(project).aliases() == {"champion": 1}


def test_a_type_skops_trusts_by_default_but_we_do_not_is_refused(project):
    "FunctionTransformer and numpy.exp are on skops' default list, not on ours: the file is refused before it loads."
    frame, labels = _rows()
    model = make_pipeline(
        FunctionTransformer(np.exp), build_pipeline("logistic_regression", ["age", "chol"], [], 0)
    ).fit(frame / 100, labels)
    data = model_bytes(model)
    assert skops.io.loads(data, trusted=["numpy.dtype"])  # skops alone loads it: its defaults trust both
    _plant(project, 2, data, rehash=True)
    with pytest.raises(LifecycleError, match="not trusted.*(FunctionTransformer|numpy.exp)"):
        load_model(Registry(project), 2)
    with pytest.raises(LifecycleError, match="not trusted"):
        set_alias(Registry(project), "champion", 2, "should be refused")
    assert Registry(project).aliases() == {"champion": 1}


def _schema_archive(schema) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("schema.json", schema if isinstance(schema, str) else json.dumps(schema))
    return out.getvalue()


def _crafted_files():
    "Model files a reviewer crafts: broken archives, broken schemas, untrusted and unexpected types."
    frame, labels = _rows()
    good = model_bytes(build_pipeline("logistic_regression", ["age", "chol"], [], 0).fit(frame, labels))
    opening = '{"__class__": "list", "__module__": "builtins", "__loader__": "ListNode", "content": ['
    deep = '{"protocol": 2, ' + opening[1:] + opening * 3000 + "]}" * 3001  # 3,000 lists in lists
    os_system = {
        "__class__": "system",
        "__module__": "os",
        "__loader__": "FunctionNode",
        "__id__": 1,
        "content": {"module_path": "os", "function": "system"},
        "protocol": 2,
    }
    return {
        "not a zip": b"not a zip file at all",
        "truncated": good[: len(good) // 2],
        "no schema": _schema_archive("{}").replace(b"schema.json", b"schemx.json"),
        "schema not JSON": _schema_archive("{not json"),
        "bad protocol": _schema_archive(
            {"__class__": "dict", "__module__": "builtins", "__loader__": "DictNode", "protocol": "x"}
        ),
        "deep nesting": _schema_archive(deep),
        "os.system": _schema_archive(os_system),
        "numpy.exp": model_bytes(make_pipeline(FunctionTransformer(np.exp), StandardScaler()).fit(frame / 100)),
        "not a classifier": model_bytes(StandardScaler().fit(frame)),
    }


@pytest.mark.parametrize("name", list(_crafted_files()))
def test_batch_refuses_a_crafted_model_file_in_one_line(project, capsys, name):
    "Each crafted file, given its matching hash, is refused by `lifecycle batch` in one line, never a traceback."
    _plant(project, 1, _crafted_files()[name], rehash=True)
    code = main(
        [
            "batch",
            "--settings",
            str(project / "settings.ini"),
            "--input",
            str(project / "in.csv"),
            "--output",
            str(project / "out.csv"),
            "--no-log",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("lifecycle: "), err
    assert not (project / "out.csv").exists()


def test_promote_refuses_a_version_whose_file_is_gone(project, capsys):
    (Registry(project).path / "versions" / "2" / "model.skops").unlink()
    code, out, err = _models(project, capsys, "promote", "2")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "is missing" in err
    code, out, err = _models(project, capsys)
    assert code == 0 and "version 2" in err
