"""Data in: sources are read, never written; settings that name a missing column, or a file that is not the data, fail
collect in one line; batch never quotes a line of input."""

import sqlite3

import numpy as np
import pandas as pd
import pytest
from conftest import COLUMNS, HEART, run_lifecycle
from test_predlog import postgres_server, postgres_url  # noqa: F401  (the real PostgreSQL fixtures)

from lifecycle.cli import main
from lifecycle.core import LifecycleError, Source
from lifecycle.registry import Registry, register, set_alias
from lifecycle.sql_sources import read_sql_table
from lifecycle.train import build_pipeline

SECRET = "PX-SECRET-4711"  # a patient value planted in bad lines: it must never reach an error


def _one_line(stderr, only=False):
    "The one error line (`lifecycle run` prints progress lines before it; with `only`, nothing else may be printed)."
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("lifecycle: ")]
    assert len(errors) == 1 and "Traceback" not in stderr and (not only or len(lines) == 1), stderr
    return errors[0]


def _clinic_db(project):
    names = COLUMNS.split(", ")
    rows = pd.read_csv(HEART / "processed.cleveland.data", header=None, names=names, na_values="?")
    with sqlite3.connect(project / "clinic.db") as db:
        rows.to_sql("patients", db, index=False)


@pytest.mark.parametrize(
    "query, says",
    [
        ("DROP TABLE patients", "the query starts with DROP"),
        ("SELECT * FROM patients; DROP TABLE patients", "query failed"),
        ("ATTACH DATABASE 'made.db' AS made", "the query starts with ATTACH"),
        (
            "SELECT * FROM patients WHERE 1 = (SELECT 1 FROM pragma_table_info('patients') LIMIT 1); ATTACH "
            "'made.db' AS made",
            "query failed",
        ),
    ],
)
def test_a_sql_source_that_writes_is_refused_in_one_line_and_writes_nothing(tmp_path, query, says):
    project = tmp_path / "sql"
    project.mkdir()
    _clinic_db(project)
    (project / "settings.ini").write_text(
        f"[data]\nsources = clinic: sqlite:///clinic.db :: {query}\ntarget = num\npositive = 1, 2, 3, 4\n"
    )
    code, _, _, stderr = run_lifecycle("run", "--settings", project / "settings.ini", "--stages", "collect")
    assert code == 1 and says in _one_line(stderr) and "source 'clinic'" in stderr
    with sqlite3.connect(project / "clinic.db") as db:
        assert db.execute("SELECT count(*) FROM patients").fetchone()[0] == 303
    assert not (project / "made.db").exists()


def test_a_postgresql_source_is_read_in_a_read_only_transaction(postgres_url):
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("CREATE TABLE patients (age float, num int)")
        db.execute("INSERT INTO patients VALUES (50, 1), (60, 0)")

    def read(query):
        return read_sql_table(Source("clinic", postgres_url, query), HEART)[0]

    assert len(read("SELECT * FROM patients")) == 2
    for query in [
        "DROP TABLE patients",
        "SELECT 1; DROP TABLE patients",
        "SELECT 1 AS a; COMMIT; SET default_transaction_read_only = off; DROP TABLE patients",
        "WITH gone AS (DELETE FROM patients RETURNING *) SELECT * FROM gone",
    ]:
        with pytest.raises(LifecycleError, match="source 'clinic'"):
            read(query)
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SELECT count(*) FROM patients").fetchone()[0] == 2


@pytest.mark.parametrize(
    "section, line, named",
    [
        ("data", "sensitive = sex, race", "[data] sensitive names column 'race'"),
        ("data", "id = patient_id", "[data] id names column 'patient_id'"),
        ("data", "timestamp = seen_at", "[data] timestamp names column 'seen_at'"),
        ("prepare", "ranges = weight: 1..300", "[prepare] ranges names column 'weight'"),
        ("prepare", "recode = gender: m -> 1", "[prepare] recode names column 'gender'"),
        ("prepare", "missing_values = glucose: 0", "[prepare] missing_values names column 'glucose'"),
    ],
)
def test_settings_naming_a_missing_column_fail_at_collect_in_one_line(heart_project, section, line, named):
    settings = heart_project / "settings.ini"
    text = settings.read_text()
    key = line.split(" =")[0]
    kept = [row for row in text.splitlines() if not row.startswith(f"{key} =")]
    if section == "data":
        kept.insert(kept.index("[data]") + 1, line)
    else:
        kept.insert(kept.index("[prepare]") + 1, line)
    settings.write_text("\n".join(kept) + "\n")
    code, run, _, stderr = run_lifecycle("run", "--settings", settings, "-p", "prepare.profile=false", "--json")
    assert code == 1
    assert [stage["status"] for stage in run["stages"]] == ["failed"]  # collect failed; train never ran
    assert named in run["error"] and "its columns are age, sex, cp" in run["error"] and "\n" not in run["error"]
    assert "KeyError" not in run["error"]


def test_a_source_that_is_not_the_data_fails_collect(heart_project, tmp_path):
    system_file = tmp_path / "passwd"
    system_file.write_text("".join(f"user{i}:x:{i}:{i}:User {i}:/home/user{i}:/bin/bash\n" for i in range(40)))
    settings = heart_project / "settings.ini"
    settings.write_text(
        settings.read_text().replace("data/heart-disease-uci/processed.hungarian.data", str(system_file))
    )
    code, _, _, stderr = run_lifecycle("run", "--settings", settings, "--stages", "collect")
    assert code == 1
    line = _one_line(stderr)
    assert "source 'hungarian': none of its 40 lines is a row of data (line 1: expected 14 fields, found" in line
    assert "user1" not in line


@pytest.fixture
def batch_project(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"age": rng.uniform(20, 80, 200).round(), "chol": rng.uniform(100, 400, 200).round()})
    registry = Registry(tmp_path)
    model = build_pipeline("logistic_regression", ["age", "chol"], [], 0).fit(frame, (frame["age"] > 50).astype(int))
    meta = {
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
    set_alias(registry, "champion", register(registry, model, meta), "test")
    (tmp_path / "settings.ini").write_text("[data]\nsources = a: in.csv\ntarget = num\npositive = 1\n")
    return tmp_path


def _batch(project, capsys, name):
    code = main(
        [
            "batch",
            "--settings",
            str(project / "settings.ini"),
            "--input",
            str(project / name),
            "--output",
            str(project / "out.parquet"),
            "--no-log",
            "--quiet",
        ]
    )
    return code, capsys.readouterr().err


@pytest.mark.parametrize("good_before", [1, 30_000])
def test_batch_names_a_malformed_csv_line_by_number_and_never_quotes_it(batch_project, capsys, good_before):
    lines = ["age,chol"] + ["50,200"] * good_before + [f"61,250,{SECRET}"] + ["40,180"] * 10
    (batch_project / "in.csv").write_text("\n".join(lines) + "\n")
    code, err = _batch(batch_project, capsys, "in.csv")
    assert code == 1
    line = _one_line(err, only=True)
    assert f"line {good_before + 2:,} has 3 fields, the header 2" in line and SECRET not in err and "61,250" not in err
    assert not (batch_project / "out.parquet").exists()


def test_batch_names_a_damaged_parquet_page_in_one_line(batch_project, capsys):
    frame = pd.DataFrame({"age": np.full(60_000, 50.0), "chol": np.arange(60_000) % 300 + 100.0})
    frame.to_parquet(batch_project / "in.parquet", row_group_size=10_000)
    data = bytearray((batch_project / "in.parquet").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 3000] = b"\xff" * 3000
    (batch_project / "in.parquet").write_bytes(bytes(data))
    code, err = _batch(batch_project, capsys, "in.parquet")
    assert code == 1 and "cannot be read as parquet" in _one_line(err, only=True)


SIDE_EFFECTS = [  # (query, the function the refusal names): each would act on the server if it ran
    ("SELECT pg_terminate_backend(pid) AS gone FROM pg_stat_activity", "pg_terminate_backend"),
    ("SELECT pg_cancel_backend(pid) AS gone FROM pg_stat_activity", "pg_cancel_backend"),
    ("SELECT age FROM patients WHERE pg_advisory_lock(4711) IS NOT NULL", "pg_advisory_lock"),
    ("SELECT set_config('default_transaction_read_only', 'off', false) AS s", "set_config"),
    ("SELECT pg_notify('lifecycle', 'hello') AS n", "pg_notify"),
    ("SELECT pg_reload_conf() AS r", "pg_reload_conf"),
    ("SELECT lo_from_bytea(0, '\\x00'::bytea) AS o", "lo_from_bytea"),
    ("SELECT * FROM pg_sleep(3600)", "pg_sleep"),
    ("SELECT age FROM patients ORDER BY pg_advisory_lock(age::bigint)::text", "pg_advisory_lock"),
    ("SELECT age FROM patients LIMIT (SELECT 1 FROM pg_advisory_lock(4712))", "pg_advisory_lock"),
    ("VALUES (pg_notify('lifecycle', 'values'))", "pg_notify"),
    ("SELECT age FROM sneaky", "pg_advisory_lock"),  # a view in the database that calls it: seen in the plan
    ("SELECT E'\\'' AS a, pg_advisory_lock(4713) AS b --'", "pg_advisory_lock"),  # E'\'' is one string
    ("SELECT /* /* nested */ */ pg_advisory_lock(4714) AS b", "pg_advisory_lock"),
    ('SELECT "pg_advisory_lock"(4715) AS b', "pg_advisory_lock"),
    ("SELECT pg_catalog.pg_advisory_lock /* gap */ (4716) AS b", "pg_advisory_lock"),
]


def test_a_postgresql_source_cannot_call_functions_with_side_effects(postgres_url):
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("CREATE TABLE patients (age float, num int)")
        db.execute("INSERT INTO patients VALUES (50, 1), (60, 0)")
        db.execute("CREATE VIEW sneaky AS SELECT age, pg_advisory_lock(4710)::text AS held FROM patients")

    def read(query):
        return read_sql_table(Source("clinic", postgres_url, query), HEART)[0]

    with psycopg.connect(postgres_url, autocommit=True) as bystander:
        bystander.execute("LISTEN lifecycle")
        for query, function in SIDE_EFFECTS:
            with pytest.raises(LifecycleError) as refused:
                read(query)
            message = str(refused.value)
            assert f"calls {function}()" in message and "source 'clinic'" in message and "\n" not in message, (
                query,
                message,
            )
        assert bystander.execute("SELECT 1").fetchone()[0] == 1  # not terminated
        assert list(bystander.notifies(timeout=0.1, stop_after=1)) == []  # nothing notified
        assert bystander.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone()[0] == 0
        assert bystander.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()[0] == 0
    # a second statement smuggled out of the subquery is refused by the server: one prepared statement only
    breakout = (
        "SELECT 1 AS a) AS x; SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE; DROP TABLE patients; "
        "SELECT * FROM (SELECT 1 AS a"
    )
    with pytest.raises(LifecycleError, match="multiple commands"):
        read(breakout)
    # what only reads still reads, random() and clock_timestamp() included
    frame = read(
        "SELECT age, random() AS r, clock_timestamp() AS t, abs(num) AS n FROM patients "
        "WHERE age > abs(-1) AND 'a%s' LIKE 'a%' ORDER BY age"
    )
    assert frame["age"].tolist() == [50.0, 60.0] and frame["r"].between(0, 1).all()
    assert len(read("SELECT * FROM patients TABLESAMPLE BERNOULLI (100) REPEATABLE (1)")) == 2


def test_a_postgresql_source_query_runs_under_a_statement_timeout(postgres_url):
    from lifecycle.sql_sources import read_postgres_query

    endless = "SELECT count(*) AS n FROM generate_series(1, 1000000) AS a, generate_series(1, 1000000) AS b"
    with pytest.raises(LifecycleError, match="statement timeout"):
        read_postgres_query(postgres_url, endless, "source 'clinic'", timeout=0.2)


@pytest.mark.parametrize(
    "case", ["a malformed line in the first block", "a malformed line past the first 64 KB", "a damaged parquet page"]
)
def test_the_dask_engine_gives_the_same_one_line_input_errors(batch_project, capfd, case):
    """The whole stderr of `lifecycle batch --engine dask` (its local cluster's workers, which write to the same file,
    included) is one line."""
    name = "in.parquet" if "parquet" in case else "in.csv"
    if "parquet" in case:
        frame = pd.DataFrame({"age": np.full(60_000, 50.0), "chol": np.arange(60_000) % 300 + 100.0})
        frame.to_parquet(batch_project / name, row_group_size=10_000)
        data = bytearray((batch_project / name).read_bytes())
        data[len(data) // 2 : len(data) // 2 + 3000] = b"\xff" * 3000
        (batch_project / name).write_bytes(bytes(data))
        expected = "cannot be read as parquet after row 30,000"
    else:
        good_before = 1 if "first block" in case else 30_000
        lines = ["age,chol"] + ["50,200"] * good_before + [f"61,250,{SECRET}"] + ["40,180"] * 10
        (batch_project / name).write_text("\n".join(lines) + "\n")
        expected = f"line {good_before + 2:,} has 3 fields, the header 2"
    capfd.readouterr()
    code = main(
        [
            "batch",
            "--settings",
            str(batch_project / "settings.ini"),
            "--input",
            str(batch_project / name),
            "--output",
            str(batch_project / "out.parquet"),
            "--engine",
            "dask",
            "--no-log",
            "--quiet",
        ]
    )
    stderr = capfd.readouterr().err
    assert code == 1
    assert expected in _one_line(stderr, only=True) and SECRET not in stderr and "61,250" not in stderr
    assert not (batch_project / "out.parquet").exists()
