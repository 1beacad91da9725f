"""A table the users declared narrower than bq-refresh's type contract (``integer`` for INT64, ``character
varying(n)`` for STRING, ``numeric(p,s)`` for NUMERIC, another column order, a unique index instead of a primary
key, a column of their own): loaded through staging (never the binary COPY of the direct load), every value
checked against the declared type first. Values that fit land exactly (compared with BigQuery value by value); a
value that does not fit fails the table naming the column, its declared type, a key and the value, with nothing
published (PostgreSQL would raise for some and silently round others)."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from blocks import BigQuerySource
from bq_refresh.errors import QualityCheckFailed
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, pg_rows, put_table, source_rows
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]

USERS_DDL = """CREATE TABLE "{s}".sqp (
    note text DEFAULT 'made by hand',
    asin character varying(12) NOT NULL, start_date date NOT NULL, search_query character varying(40) NOT NULL,
    impressions integer, click_share numeric(12,9), median_price numeric(20,9), updated_at timestamptz)"""


def users_table(pg: psycopg.Connection[Any], s: str) -> None:
    pg.execute(USERS_DDL.format(s=s))
    pg.execute(f'CREATE UNIQUE INDEX sqp_key ON "{s}".sqp (start_date, asin, search_query)')


def live(pg: psycopg.Connection[Any], s: str) -> list[dict[str, Any]]:
    return pg_rows(pg, f'"{s}".sqp', "start_date, asin, search_query")


def with_value(rows: pa.Table, column: str, at: int, value: Any) -> pa.Table:
    values = rows.column(column).to_pylist()
    values[at] = value
    return rows.set_column(rows.schema.get_field_index(column), column,
                           pa.array(values, rows.schema.field(column).type))


def test_values_that_fit_the_declared_types_land_exactly_through_staging(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    s = registry
    users_table(pg, s)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(300))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    run = refresh_table("sqp")
    assert run["status"] == "success" and run["direct_load"] is False and run["rows_inserted"] == 300
    rows = live(pg, s)
    assert {r["note"] for r in rows} == {"made by hand"}  # their own column, untouched
    assert_same_rows(source_rows(source, "sqp"), rows, SQP_KEY, ignore={"note"})
    declared = dict(pg.execute("SELECT column_name, data_type FROM information_schema.columns"
                               " WHERE table_schema = %s AND table_name = 'sqp'", (s,)).fetchall())
    assert declared["impressions"] == "integer" and declared["asin"] == "character varying"  # DDL unchanged


@pytest.mark.parametrize(("column", "value", "says"), [
    ("impressions", 3_000_000_000, "impressions is declared integer"),
    ("search_query", "q" * 41, "search_query is declared character varying(40)"),
    ("median_price", Decimal("12345678901234.123456789"), "median_price is declared numeric(20,9)"),
    ("click_share", Decimal("0.5000000001").quantize(Decimal("0.000000001")) + Decimal(1000), "click_share is declared"),
], ids=["int4-range", "varchar-length", "numeric-precision", "numeric-precision-small"])
def test_a_value_the_declared_column_cannot_hold_fails_the_table_naming_it_and_publishes_nothing(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
    column: str, value: Any, says: str,
) -> None:
    s = registry
    users_table(pg, s)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(200))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    assert refresh_table("sqp")["status"] == "success"
    before = live(pg, s)
    put_table(source, "sqp", SQP_SCHEMA, with_value(sqp_rows(200), column, 7, value))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "full"})
    with pytest.raises(QualityCheckFailed, match=re.escape(says) + r".*1 value\(s\) it cannot hold, e\.g\. "
                       + re.escape(str(value)[:12])):
        refresh_table("sqp")
    assert_same_rows(before, live(pg, s), SQP_KEY, ignore=())  # nothing published
    failed = pg.execute(f'SELECT metric_name FROM "{s}".refresh_data_quality WHERE NOT is_within_threshold').fetchall()
    assert (f"fits:{column}",) in failed
