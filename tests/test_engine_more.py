"""More of the engine: property-based type round trips, parallel streams, query sources, full mode, dry run."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocks import BigQuerySource
from bq_refresh.errors import SourceError
from flows.refresh_table import refresh_table
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, bq_schema, pg_rows, put_table, source_rows
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]

PROP_SCHEMA = bq_schema([("id", "INT64", "REQUIRED"), ("n", "NUMERIC"), ("s", "STRING"), ("ts", "TIMESTAMP"),
                         ("dt", "DATETIME"), ("d", "DATE"), ("f", "FLOAT64"), ("by", "BYTES"), ("j", "JSON")])

numerics = st.decimals(min_value=Decimal("-99999999999999999999999999999.999999999"),
                       max_value=Decimal("99999999999999999999999999999.999999999"), places=9,
                       allow_nan=False, allow_infinity=False)
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
stamps = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30))
json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**53), 2**53) | texts,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=6)
row = st.fixed_dictionaries({
    "n": st.none() | numerics, "s": st.none() | texts, "ts": st.none() | stamps, "dt": st.none() | stamps,
    "d": st.none() | st.dates(min_value=date(1, 1, 1), max_value=date(9999, 12, 31)),
    "f": st.none() | st.floats(allow_nan=False, allow_infinity=False), "by": st.none() | st.binary(max_size=20),
    "j": st.none() | json_values,
})


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.lists(row, min_size=1, max_size=40))
def test_generated_values_round_trip_exactly(rows: list[dict[str, Any]], env: Any, pg: psycopg.Connection[Any],
                                             source_and_registry: tuple[BigQuerySource, str]) -> None:
    source, schema = source_and_registry
    for i, r in enumerate(rows):
        r["id"] = i
    data = pa.table({
        "id": pa.array([r["id"] for r in rows], pa.int64()),
        "n": pa.array([r["n"] for r in rows], pa.decimal128(38, 9)),
        "s": pa.array([r["s"] for r in rows], pa.string()),
        "ts": pa.array([r["ts"] and r["ts"].replace(tzinfo=UTC) for r in rows], pa.timestamp("us", tz="UTC")),
        "dt": pa.array([r["dt"] for r in rows], pa.timestamp("us")),
        "d": pa.array([r["d"] for r in rows], pa.date32()),
        "f": pa.array([r["f"] for r in rows], pa.float64()),
        "by": pa.array([r["by"] for r in rows], pa.binary()),
        "j": pa.array([None if r["j"] is None else json.dumps(r["j"]) for r in rows], pa.string()),
    })
    put_table(source, "prop", PROP_SCHEMA, data)
    register_table(pg, schema, "prop", {"source": "prop", "key": ["id"], "mode": "full",
                                        "delete_policy": {"max_delete_fraction": 1.0}})
    refresh_table("prop", full_refresh=True)
    expected = data.to_pylist()
    for r in expected:
        r["j"] = None if r["j"] is None else json.loads(r["j"])
    assert_same_rows(expected, pg_rows(pg, f'"{schema}".prop', "id"), ["id"])


@pytest.fixture
def source_and_registry(env: Any, pg: psycopg.Connection[Any]) -> tuple[BigQuerySource, str]:
    from tasks.migrations import apply_migrations

    apply_migrations(pg, env.schema_name)
    return BigQuerySource.from_settings(env), env.schema_name


def test_parallel_streams_read_everything_once(source_and_registry: tuple[BigQuerySource, str],
                                               pg: psycopg.Connection[Any]) -> None:
    source, schema = source_and_registry
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(30_000, weeks=4))
    register_table(pg, schema, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "streams": 4,
                                       "batch_size": 2000})
    result = refresh_table("sqp")
    session = result["read_session"]
    assert result["rows_read"] == 30_000 and result["rows_inserted"] == 30_000 and result["duplicate_keys"] == 0
    ckpt = pg.execute(f'SELECT checkpoint_data FROM "{schema}".refresh_checkpoints').fetchone()
    assert ckpt is not None and len(ckpt[0]["session"]["streams"]) == 4, "the emulator gave fewer streams"
    assert session == ckpt[0]["session"]["name"]
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{schema}".sqp', "1"), SQP_KEY)


def test_a_query_source_runs_as_a_job_and_is_read_the_same_way(source_and_registry: tuple[BigQuerySource, str],
                                                                 pg: psycopg.Connection[Any]) -> None:
    source, schema = source_and_registry
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(300, weeks=3))
    query = (f"SELECT start_date, asin, SUM(impressions) AS impressions, MAX(updated_at) AS updated_at "
             f"FROM `{source.table_ref('sqp')}` GROUP BY start_date, asin")
    register_table(pg, schema, "weekly", {"query": query, "key": ["start_date", "asin"], "mode": "full"})
    result = refresh_table("weekly")
    assert result["rows_inserted"] == 291  # 97 ASINs x 3 weeks
    audit = pg.execute(f'SELECT bigquery_job_id FROM "{schema}".refresh_audit_log').fetchone()
    assert audit is not None and audit[0] and "sessions" not in audit[0]  # the query job's id
    total = pg.execute(f'SELECT sum(impressions) FROM "{schema}".weekly').fetchone()
    assert total == (sum(sqp_rows(300, weeks=3).column("impressions").to_pylist()),)


def test_full_mode_replaces_contents_and_keeps_dependent_views(source_and_registry: tuple[BigQuerySource, str],
                                                               pg: psycopg.Connection[Any]) -> None:
    source, schema = source_and_registry
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(100))
    register_table(pg, schema, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "full",
                                       "delete_policy": {"max_delete_fraction": 1.0}})
    refresh_table("sqp")
    pg.execute(f'CREATE VIEW "{schema}".sqp_view AS SELECT asin, impressions FROM "{schema}".sqp')
    pg.execute(f'CREATE INDEX ON "{schema}".sqp (asin)')
    smaller = sqp_rows(100).slice(0, 60)
    put_table(source, "sqp", SQP_SCHEMA, smaller)
    result = refresh_table("sqp")
    assert (result["rows_inserted"], result["rows_updated"], result["rows_deleted"]) == (0, 0, 40)
    assert pg.execute(f'SELECT count(*) FROM "{schema}".sqp_view').fetchone() == (60,)
    indexes = pg.execute("SELECT count(*) FROM pg_indexes WHERE schemaname = %s AND tablename = 'sqp'", (schema,)).fetchone()
    assert indexes == (2,)


def test_mass_delete_guard_publishes_nothing(source_and_registry: tuple[BigQuerySource, str],
                                             pg: psycopg.Connection[Any]) -> None:
    source, schema = source_and_registry
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(100))
    register_table(pg, schema, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "full"})
    refresh_table("sqp")
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(100, updated=datetime(2026, 1, 1, tzinfo=UTC)).slice(0, 10))
    from bq_refresh.errors import QualityCheckFailed

    with pytest.raises(QualityCheckFailed, match="refusing to delete 90 of 100 rows"):
        refresh_table("sqp")
    unchanged = pg.execute(f'SELECT count(*), max(updated_at) FROM "{schema}".sqp').fetchone()
    assert unchanged is not None and unchanged[0] == 100 and unchanged[1].year == 2025


def test_dry_run_reports_and_publishes_nothing(source_and_registry: tuple[BigQuerySource, str],
                                               pg: psycopg.Connection[Any]) -> None:
    source, schema = source_and_registry
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(50))
    register_table(pg, schema, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    result = refresh_table("sqp", dry_run=True)
    assert result["rows_inserted"] == 50 and result["dry_run"] is True
    assert pg.execute(f'SELECT count(*) FROM "{schema}".sqp').fetchone() == (0,)
    assert pg.execute(f'SELECT watermark FROM "{schema}".refresh_config').fetchone() == (None,)
    assert pg.execute(f'SELECT count(*) FROM "{schema}".refresh_checkpoints WHERE status = %s', ("active",)).fetchone() == (0,)
    assert refresh_table("sqp")["rows_inserted"] == 50


def test_text_with_nul_is_a_clear_error_and_nothing_is_published(source_and_registry: tuple[BigQuerySource, str],
                                                                 pg: psycopg.Connection[Any]) -> None:
    source, schema = source_and_registry
    data = pa.table({"id": pa.array([1, 2], pa.int64()), "s": ["fine", "bad\x00value"]})
    put_table(source, "nul", bq_schema([("id", "INT64"), ("s", "STRING")]), data)
    register_table(pg, schema, "nul", {"source": "nul", "key": ["id"], "mode": "full"})
    with pytest.raises(SourceError, match=r"column 's' holds text with NUL"):
        refresh_table("nul")
    assert pg.execute(f'SELECT count(*) FROM "{schema}".nul').fetchone() == (0,)
    audit = pg.execute(f'SELECT status, error_message FROM "{schema}".refresh_audit_log').fetchone()
    assert audit is not None and audit[0] == "failed" and "'s'" in audit[1]


def test_date_and_int64_cursors(source_and_registry: tuple[BigQuerySource, str], pg: psycopg.Connection[Any]) -> None:
    source, schema = source_and_registry
    schema_fields = bq_schema([("id", "INT64"), ("version", "INT64"), ("day", "DATE")])
    data = pa.table({"id": pa.array(range(10), pa.int64()), "version": pa.array(range(10), pa.int64()),
                     "day": pa.array([date(2025, 1, 1) + timedelta(days=i) for i in range(10)], pa.date32())})
    put_table(source, "v", schema_fields, data)
    register_table(pg, schema, "by_int", {"source": "v", "key": ["id"], "cursor": "version", "lookback": "2"})
    register_table(pg, schema, "by_day", {"source": "v", "key": ["id"], "cursor": "day", "lookback": "1d"})
    assert refresh_table("by_int")["rows_read"] == 10 and refresh_table("by_day")["rows_read"] == 10
    assert refresh_table("by_int")["rows_read"] == 3  # version >= 9 - 2 (the read includes the floor's own value)
    assert refresh_table("by_day")["rows_read"] == 2  # day >= 2025-01-10 - 1 day


def test_renames_snake_case_and_a_derived_column(source_and_registry: tuple[BigQuerySource, str],
                                                 pg: psycopg.Connection[Any]) -> None:
    source, schema = source_and_registry
    fields = bq_schema([("startDate", "DATE"), ("ASIN", "STRING"), ("searchQuery", "STRING"),
                        ("clickShare", "NUMERIC"), ("Detail", "RECORD")])
    fields[-1] = type(fields[-1])("Detail", "RECORD", fields=bq_schema([("x", "INT64"), ("label", "STRING")]))
    data = pa.table({
        "startDate": pa.array([date(2025, 1, 5), date(2025, 1, 12)], pa.date32()), "ASIN": ["B01", "B02"],
        "searchQuery": ["  shoes ", "hat"], "clickShare": pa.array([Decimal("0.5"), None], pa.decimal128(38, 9)),
        "Detail": [{"x": 1, "label": "ü"}, None],
    })
    put_table(source, "camel", fields, data)
    register_table(pg, schema, "camel", {
        "source": "camel", "key": ["startDate", "ASIN", "searchQuery"], "mode": "full", "snake_case": True,
        "rename": {"ASIN": "asin"}, "transform": "sqp_week_end",
    })
    refresh_table("camel")
    rows = pg.execute(f'SELECT start_date, asin, search_query, click_share, detail, week_end_date FROM "{schema}".camel'
                      " ORDER BY start_date").fetchall()
    assert rows == [
        (date(2025, 1, 5), "B01", "  shoes ", Decimal("0.500000000"), {"x": 1, "label": "ü"}, date(2025, 1, 11)),
        (date(2025, 1, 12), "B02", "hat", None, None, date(2025, 1, 18)),
    ]
