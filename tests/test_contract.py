"""One record contract: prepare, the online path (what serve calls), batch and streams read a record the same way.

Hypothesis generates records, clean and messy (`50k`, `1,200`, `?`, `Male`/`m`, out of range, unseen category,
wrong type, missing), and each path must give the same verdict, the same reason, the same cleaned values and the
same score. And the fast path is checked against `predict_proba` for every model kind the project trains."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle.contract import error_reason
from lifecycle.core import load_settings
from lifecycle.prepare import prepare, store_schema
from lifecycle.serving.scoring import FastPath, Scorer
from lifecycle.serving.stream import score_events
from lifecycle.train import MODELS, build_pipeline

NUMERIC, CATEGORICAL = ["age", "chol"], ["sex", "cp", "color"]
FEATURES = NUMERIC + CATEGORICAL
COLUMNS = {
    "age": {"kind": "numeric", "min": 1.0, "max": 120.0},
    "chol": {"kind": "numeric", "min": 80.0, "max": 700.0},
    "sex": {"kind": "category", "type": "number", "categories": [0.0, 1.0]},
    "cp": {"kind": "category", "type": "number", "categories": [1.0, 2.0, 3.0, 4.0]},
    "color": {"kind": "category", "type": "text", "categories": ["blue", "red"]},
    "pid": {"kind": "id"},
}
RECODE = {"sex": "m -> 1, male -> 1, f -> 0, female -> 0", "color": "r -> red"}
MISSING_VALUES = {"chol": "0"}
META = {
    "version": 1,
    "sha256": "ab" * 32,
    "threshold": 0.5,
    "features": {"numeric": NUMERIC, "categorical": CATEGORICAL},
    "schema": {"target": "num", "columns": COLUMNS},
    "settings": {
        "data": {"na_values": "?", "id": "pid"},
        "prepare": {
            "recode": "\n".join(f"{c}: {t}" for c, t in RECODE.items()),
            "missing_values": "\n".join(f"{c}: {t}" for c, t in MISSING_VALUES.items()),
        },
    },
}


def _training(n=400, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.uniform(20, 80, n).round(),
            "chol": rng.uniform(100, 400, n).round(),
            "sex": rng.integers(0, 2, n).astype(float),
            "cp": rng.integers(1, 5, n).astype(float),
            "color": rng.choice(["blue", "red"], n).astype(object),
        }
    )
    frame.loc[::7, "chol"] = np.nan
    frame.loc[::11, "color"] = np.nan
    labels = (frame["age"] + 30 * frame["sex"] + 5 * frame["cp"] + rng.normal(0, 10, n) > 80).astype(int)
    return frame, labels


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    "A project whose stored schema is the model's, and a gradient boosting model trained under it."
    root = tmp_path_factory.mktemp("contract")
    (root / "settings.ini").write_text(
        "[data]\nsources = a: a.csv\ntarget = num\npositive = 1\nid = pid\nna_values = ?\n"
    )
    store_schema(root, {"target": "num", "columns": COLUMNS}, "v0", "test")
    frame, labels = _training()
    model = build_pipeline("hist_gradient_boosting", NUMERIC, CATEGORICAL, 0).fit(frame, labels)
    scorer = Scorer(model, META)
    assert scorer.fast is not None, scorer.fast_reason
    return load_settings(root / "settings.ini"), scorer


_number = st.one_of(
    st.integers(1, 120),
    st.floats(1, 120, allow_nan=False).map(lambda x: round(x, 2)),
    st.sampled_from(
        [
            "63",
            " 41 ",
            "0.05k",
            "1,200",
            "0.2K",
            "?",
            "",
            "old",
            "12kg",
            "nan",
            "inf",
            True,
            False,
            0,
            0.0,
            300,
            -5,
            800,
            10**309,
            float("inf"),
            None,
            "3.5M",
            " 250 ",
        ]
    ),
)
_sex = st.sampled_from([0, 1, 0.0, 1.0, "m", "Male", " F ", "female", "1", "?", 7, "x", True, None, 1.5, "0"])
_cp = st.sampled_from([1, 2, 3, 4, "3", 5, 2.5, "?", None, "two", 4.0])
_color = st.sampled_from(["red", " Blue ", "R", "RED", "green", 3, None, "?", True, "", "blue"])
_record = st.fixed_dictionaries({"age": _number, "chol": _number, "sex": _sex, "cp": _cp, "color": _color})


def _same(a, b) -> bool:
    "Equal cleaned values: NaN is NaN, numbers are floats, text is text."
    a, b = (v.item() if isinstance(v, np.generic) else v for v in (a, b))
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b))
    return type(a) is type(b) and a == b


def _prepared(settings, records):
    "Prepare's verdict on each record as a row of a snapshot: (reason, cleaned values or None) per row."
    snapshot = pd.DataFrame(records, columns=FEATURES, dtype=object)
    snapshot["pid"] = [f"p{i}" for i in range(len(records))]  # every row a patient of its own: no duplicates
    snapshot["num"] = 1
    snapshot["_source"], snapshot["_file"], snapshot["_line"] = "a", "a.csv", np.arange(1, len(records) + 1)
    result = prepare(snapshot, settings, "v1", recode=RECODE, missing_values=MISSING_VALUES)
    assert len(result["duplicates"]) == 0
    reasons = result["quarantined"]["_reason"].to_dict()
    clean = result["clean"]
    verdicts = []
    for i in range(len(records)):
        if i in reasons:
            verdicts.append((reasons[i], None))
        else:
            verdicts.append(("", [clean.at[i, name] for name in FEATURES]))
    return verdicts


def _online(scorer, records):
    "What serve computes: check_records and the fast path, through Scorer.score_records."
    from lifecycle.serving.scoring import check_records

    rows, errors = check_records(records, scorer.spec)
    predictions, errors_again = scorer.score_records(records)
    assert errors == errors_again
    first = {}
    for error in errors:
        first.setdefault(error["loc"][1], error_reason(error))
    return [(first.get(i, ""), rows[i], predictions[i].score if predictions[i] else None) for i in range(len(records))]


def _batch(scorer, records):
    "What batch computes on a chunk: the contract's frame check and the fast path's matrix (Scorer.score_frame)."
    done = scorer.score_frame(pd.DataFrame(records, columns=FEATURES, dtype=object))
    features = done["features"].astype(object).values.tolist()
    scores = iter(zip(features, done["scores"].tolist()))
    out = []
    for reason, good in zip(done["reasons"].tolist(), done["good"].tolist()):
        values, score = next(scores) if good else (None, None)
        out.append((reason, values, score))
    return out


def _stream(scorer, records):
    "What a stream computes: JSON lines in, one output per event."
    events = [(i, json.dumps(record), None, None) for i, record in enumerate(records)]
    outputs, logged = score_events(events, scorer, b"k" * 32, "test/")
    logged = iter(logged)
    results = []
    for output in outputs:
        if "errors" in output:
            first = output["errors"][0]
            results.append((error_reason({**first, "loc": ["body", 0, *first["loc"][1:]]}), output.get("score"), None))
        else:
            features = next(logged)["features"]  # what the stream logs: the cleaned values, as training saw them
            results.append(
                ("", output["score"], [np.nan if features[name] is None else features[name] for name in FEATURES])
            )
    return results


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.lists(_record, min_size=1, max_size=12))
def test_every_path_reads_a_record_the_same_way(world, records):
    settings_, scorer = world
    prepared = _prepared(settings_, records)
    online = _online(scorer, records)
    batch = _batch(scorer, records)
    stream = _stream(scorer, records)
    for i, record in enumerate(records):
        reason = prepared[i][0]
        assert online[i][0] == reason and batch[i][0] == reason and stream[i][0] == reason, (
            record,
            prepared[i],
            online[i],
            batch[i],
            stream[i],
        )
        if reason:
            assert online[i][1] is None and online[i][2] is None and stream[i][1] is None
            continue
        cleaned = prepared[i][1]
        assert all(_same(a, b) for a, b in zip(cleaned, online[i][1])), (record, cleaned, online[i][1])
        assert all(_same(a, b) for a, b in zip(cleaned, batch[i][1])), (record, cleaned, batch[i][1])
        assert all(_same(a, b) for a, b in zip(cleaned, stream[i][2])), (record, cleaned, stream[i][2])
        expected = scorer.model.predict_proba(
            pd.DataFrame([cleaned], columns=FEATURES).astype({n: float for n in FEATURES[:4]})
        )[0, 1]
        assert online[i][2] == batch[i][2] == stream[i][1] == expected, (
            record,
            online[i][2],
            batch[i][2],
            stream[i][1],
            expected,
        )


def test_the_defaults_project_s_own_missing_marker_is_missing_online(world):
    '`"ca": "?"` got a 422 "expected a number" from POST /predict; the contract reads it as training did: missing.'
    _, scorer = world
    predictions, errors = scorer.score_records([{"age": 63, "chol": "?", "sex": "male", "cp": "?", "color": "R"}])
    assert errors == [] and predictions[0] is not None


def test_record_only_rules(world):
    "What a frame cannot hold: an absent field, an unknown field, a nested value, an identifier that cannot be logged."
    _, scorer = world
    base = {"age": 63, "chol": 200, "sex": 1, "cp": 1, "color": "red"}
    cases = [
        ({k: v for k, v in base.items() if k != "cp"}, ["missing"]),
        ({**base, "weight": 80}, ["extra_forbidden"]),
        ({**base, "\ud800\x00<b>": 1}, ["extra_forbidden"]),
        ({**base, "age": [63]}, ["type_error.number"]),
        ({**base, "color": {"a": 1}}, ["type_error.str"]),
        ({**base, "pid": "\ud800"}, ["value_error.id"]),
        ({**base, "pid": "x" * 201}, ["value_error.id"]),
        ({**base, "age": 10**309}, ["value_error.not_finite"]),
        ({**base, "age": float("nan")}, ["value_error.not_finite"]),
        ({"age": None, "chol": None, "sex": None, "cp": 1, "color": "red"}, ["too_many_missing"]),
        ({**base, "pid": 17}, []),
    ]
    for record, kinds in cases:
        _, errors = scorer.score_records([record])
        assert [e["type"] for e in errors] == kinds, (record, errors)
        text = json.dumps(errors)
        text.encode("utf-8")  # every error can be sent
        assert "<b>" not in text and "\\ud800" not in text
    outputs, _ = score_events(
        [(0, json.dumps({**base, "cp": None, "age": "?", "chol": 0, "sex": None}), None, None)], scorer, b"k" * 32
    )
    assert outputs[0]["errors"][0]["type"] == "too_many_missing"


# --- the fast path, checked at load ------------------------------------------------------------


@pytest.mark.parametrize("kind", MODELS)
def test_fast_path_checked_for_every_model_kind(kind):
    frame, labels = _training()
    model = build_pipeline(kind, NUMERIC, CATEGORICAL, 0).fit(frame, labels)
    scorer = Scorer(model, META)
    assert scorer.fast is not None and scorer.fast_reason is None, scorer.fast_reason
    records = [
        {**{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}}
        for row in frame.head(80).to_dict("records")
    ]
    predictions, errors = scorer.score_records(records)
    assert errors == []
    expected = model.predict_proba(frame.head(80))[:, 1]
    assert np.max(np.abs(np.array([p.score for p in predictions]) - expected)) <= 1e-12
    assert np.max(np.abs(scorer.score_frame(frame.head(80))["scores"] - expected)) <= 1e-12


@pytest.mark.parametrize("kind", MODELS)
def test_a_fast_path_that_disagrees_falls_back_to_the_pipeline(kind, monkeypatch):
    "A changed private attribute (here: the imputer's medians read wrong) must not change a score."
    frame, labels = _training()
    model = build_pipeline(kind, NUMERIC, CATEGORICAL, 0).fit(frame, labels)
    original = FastPath.__init__

    def wrong(self, *args):
        original(self, *args)
        self.medians = self.medians + 1.0

    monkeypatch.setattr(FastPath, "__init__", wrong)
    scorer = Scorer(model, META)
    assert scorer.fast is None and "differs from the pipeline" in scorer.fast_reason
    missing = frame.head(20).assign(chol=np.nan)
    records = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in missing.to_dict("records")
    ]
    assert np.array_equal([p.score for p in scorer.score_records(records)[0]], model.predict_proba(missing)[:, 1])


def test_tree_walk_mismatch_is_caught(monkeypatch):
    "The boosted trees' walk is checked on its own: a wrong leaf value is a mismatch."
    from lifecycle.serving import scoring

    frame, labels = _training()
    model = build_pipeline("hist_gradient_boosting", NUMERIC, CATEGORICAL, 0).fit(frame, labels)
    original = scoring.TreeEnsemble.__init__

    def wrong(self, *args):
        original(self, *args)
        self.value = self.value * 1.001

    monkeypatch.setattr(scoring.TreeEnsemble, "__init__", wrong)
    scorer = Scorer(model, META)
    assert scorer.fast is None and "tree walk" in scorer.fast_reason


# --- the server: limits of a request, and what /model says about the fast path ----------------


def test_server_caps_records_and_errors(tmp_path):
    """`[{}]` * 50,000 must not make 650,000 errors: more records than the cap are one error; errors are listed up to a
    cap, with a count."""
    import time

    from fastapi.testclient import TestClient

    from lifecycle.registry import Registry, register, set_alias
    from lifecycle.serving.serve import create_app

    frame, labels = _training()
    registry = Registry(tmp_path)
    meta = {k: v for k, v in META.items() if k not in ("version", "sha256")}
    set_alias(
        registry,
        "champion",
        register(registry, build_pipeline("hist_gradient_boosting", NUMERIC, CATEGORICAL, 0).fit(frame, labels), meta),
        "test",
    )
    app = create_app(tmp_path, max_records=1000, max_errors=100, log_url=str(tmp_path / "log.sqlite"))
    with TestClient(app) as client:
        for _ in range(200):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        about = client.get("/model").json()
        assert about["fast_path"] is True and about["fast_path_reason"] is None
        too_many = client.post("/predict", json=[{}] * 1001)
        assert too_many.status_code == 422 and too_many.json()["detail"][0]["type"] == "too_many_records"
        many_errors = client.post("/predict", json=[{}] * 1000)
        assert many_errors.status_code == 422
        body = many_errors.json()
        assert len(body["detail"]) == 100 and body["errors_total"] == 5000
        fine = client.post("/predict", json={"age": "0.05k", "chol": "?", "sex": "Male", "cp": "3", "color": " r "})
        assert fine.status_code == 200, fine.text
