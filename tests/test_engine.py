"""The sync engine end to end: emulator -> Storage Read -> Polars -> ADBC staging -> publish."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from blocks import BigQuerySource
from bq_refresh.errors import ConfigError, SchemaDriftError, SourceError
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, bq_schema, pg_rows, put_table, source_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]

T0 = datetime(2025, 1, 5, 12, 0, tzinfo=timezone.utc)

SQP_SCHEMA = bq_schema([
    ("start_date", "DATE", "REQUIRED"), ("asin", "STRING", "REQUIRED"), ("search_query", "STRING", "REQUIRED"),
    ("impressions", "INT64"), ("click_share", "NUMERIC"), ("median_price", "NUMERIC"), ("updated_at", "TIMESTAMP"),
])


def sqp_rows(n: int, *, updated: datetime = T0, weeks: int = 2, price_bump: Decimal = Decimal(0)) -> pa.Table:
    rows: dict[str, list[Any]] = {k: [] for k in ("start_date", "asin", "search_query", "impressions",
                                                   "click_share", "median_price", "updated_at")}
    for i in range(n):
        rows["start_date"].append(date(2025, 1, 5) + timedelta(weeks=i % weeks))
        rows["asin"].append(f"B0{i % 97:08d}")
        rows["search_query"].append(f"query {i // 97}")
        rows["impressions"].append(1000 + i)
        rows["click_share"].append(Decimal(i % 1000) / Decimal(1000))
        rows["median_price"].append(Decimal("19.990000001") + price_bump + Decimal(i) / 100)
        rows["updated_at"].append(updated + timedelta(microseconds=i))
    return pa.table({
        "start_date": pa.array(rows["start_date"], pa.date32()), "asin": rows["asin"],
        "search_query": rows["search_query"], "impressions": pa.array(rows["impressions"], pa.int64()),
        "click_share": pa.array(rows["click_share"], pa.decimal128(38, 9)),
        "median_price": pa.array(rows["median_price"], pa.decimal128(38, 9)),
        "updated_at": pa.array(rows["updated_at"], pa.timestamp("us", tz="UTC")),
    })


SQP_KEY = ["start_date", "asin", "search_query"]


@pytest.fixture
def source(env: Settings) -> BigQuerySource:
    return BigQuerySource.from_settings(env)


@pytest.fixture
def registry(env: Settings, pg: psycopg.Connection[Any]) -> str:
    apply_migrations(pg, env.schema_name)
    return env.schema_name


def register(pg: psycopg.Connection[Any], schema: str, name: str, **params: Any) -> None:
    register_table(pg, schema, name, params)


def test_incremental_sync_is_exact_and_a_rerun_changes_nothing(
    source: BigQuerySource, registry: str, pg: psycopg.Connection[Any]
) -> None:
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(500))
    register(pg, registry, "sqp", source="sqp", key=SQP_KEY, cursor="updated_at", batch_size=128)

    first = refresh_table("sqp")
    assert first["status"] == "success"
    assert (first["rows_read"], first["rows_inserted"], first["rows_updated"]) == (500, 500, 0)
    assert first["batches"] >= 4
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{registry}".sqp', "1"), SQP_KEY)

    again = refresh_table("sqp")
    assert (again["rows_inserted"], again["rows_updated"], again["rows_deleted"]) == (0, 0, 0)
    audit = pg.execute(
        f'SELECT status, rows_processed, rows_inserted, bigquery_job_id, memory_used_mb FROM "{registry}".refresh_audit_log ORDER BY id'
    ).fetchall()
    assert [a[0] for a in audit] == ["success", "success"]
    assert audit[0][1] == 500 and audit[0][2] == 500 and audit[0][3] and audit[0][4] > 0
    staging_left = pg.execute(
        "SELECT count(*) FROM pg_tables WHERE schemaname = %s", (f"{registry}_staging",)
    ).fetchone()
    assert staging_left == (0,)
