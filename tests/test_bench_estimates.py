"""`lifecycle bench estimate-multiclass` on the four hospitals' grades: without NannyML's venv it says so in one line
and prints ours, its realized figures agree with scikit-learn's; with the venv (not in CI), NannyML answers for the
very chunks ours did."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from lifecycle.bench.estimate_multiclass import bench_estimate_multiclass
from lifecycle.bench.nannyml_side import NANNYML_MISSING, nannyml_python


def test_without_nannyml_the_bench_says_so_and_prints_ours(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LIFECYCLE_NANNYML_PYTHON", str(tmp_path / "no-such-python"))
    figures = bench_estimate_multiclass()
    printed = capsys.readouterr().out
    assert figures["nannyml"] is None and NANNYML_MISSING in printed
    assert printed.count("NannyML: not measured") == 1
    chunks = [row["chunk"] for row in figures["rows"] if row["metric"] == "accuracy"]
    assert chunks[:2] == ["held-out 1", "held-out 2"] and chunks[-1].startswith("switzerland")
    assert all(row["ours"] is not None and row["nannyml"] is None for row in figures["rows"])
    assert figures["summary"]["accuracy"]["chunks"] == len(chunks) and figures["summary"]["speedup"] is None


def test_the_realized_figures_are_scikit_learns():
    "The bench's own confusion arithmetic against scikit-learn's accuracy and macro-F1 (over present or called)."
    from lifecycle.bench.estimate_multiclass import realized_figures

    rng = np.random.default_rng(7)
    for _ in range(20):
        labels = rng.integers(0, 5, 60)
        proba = rng.dirichlet(np.ones(5), 60)
        called = proba.argmax(axis=1)
        figures = realized_figures(labels, proba, [0, 1, 2, 3, 4])
        assert figures["accuracy"] == pytest.approx(accuracy_score(labels, called))
        assert figures["macro_f1"] == pytest.approx(f1_score(labels, called, average="macro"))


@pytest.mark.skipif(nannyml_python() is None, reason="no .venv-nannyml (make nannyml-venv): a bench, not CI")
def test_nannyml_estimates_the_same_chunks():
    figures = bench_estimate_multiclass(quiet=True)
    ours = [row["chunk"] for row in figures["rows"] if row["metric"] == "accuracy"]
    assert list(figures["nannyml"]["chunks"]) == ours
    for row in figures["rows"]:
        assert 0 <= row["nannyml"] <= 1 and row["nannyml_low"] <= row["nannyml"] <= row["nannyml_high"]
    assert figures["nannyml"]["fit_cpu"] > 0 and figures["summary"]["speedup"] > 0
