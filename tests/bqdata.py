"""Test helpers: put Arrow data into the BigQuery emulator, read both sides back, compare (tests/comparator.py)."""

from __future__ import annotations

import io
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
from google.api_core.retry import Retry
from google.cloud import bigquery

from blocks import BigQuerySource
from tests.comparator import assert_same_rows as assert_same_rows  # the strict comparator, re-exported

SHORT = Retry(timeout=20)


def bq_schema(spec: list[tuple[str, str] | tuple[str, str, str]]) -> list[bigquery.SchemaField]:
    out = []
    for item in spec:
        name, kind = item[0], item[1]
        mode = item[2] if len(item) > 2 else "NULLABLE"  # type: ignore[misc]
        out.append(bigquery.SchemaField(name, kind, mode=mode))
    return out


def put_table(source: BigQuerySource, name: str, schema: list[bigquery.SchemaField], data: pa.Table, *,
              replace: bool = True) -> None:
    """Create (or replace) a source table with an explicit schema and load ``data`` (resumable upload)."""
    client = source.get_bigquery_client()
    ref = source.table_ref(name)
    if replace:
        client.delete_table(ref, not_found_ok=True, retry=SHORT)
        client.create_table(bigquery.Table(ref, schema=schema), retry=SHORT)
    if data.num_rows == 0:
        return
    buf = io.BytesIO()
    pq.write_table(data, buf)
    buf.seek(0)
    config = bigquery.LoadJobConfig(source_format="PARQUET", write_disposition="WRITE_APPEND")
    client.load_table_from_file(buf, ref, job_config=config).result(timeout=120, retry=SHORT)


def run_sql(source: BigQuerySource, query: str) -> None:
    source.get_bigquery_client().query(query, retry=SHORT, job_retry=None).result(timeout=60, retry=SHORT)


def source_rows(source: BigQuerySource, name: str) -> list[dict[str, Any]]:
    client = source.get_bigquery_client()
    rows = client.query(f"SELECT * FROM `{source.table_ref(name)}`", retry=SHORT, job_retry=None).result(retry=SHORT)
    return [dict(r.items()) for r in rows]


def pg_rows(conn: psycopg.Connection[Any], table: str, order_by: str) -> list[dict[str, Any]]:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT * FROM {table} ORDER BY {order_by}")
        return list(cur.fetchall())


def norm(value: Any) -> Any:
    if isinstance(value, Decimal):
        return value.normalize()
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def create_sqp_target(conn: psycopg.Connection[Any], schema: str) -> None:
    """A target made by someone else before the first refresh: the SQP test columns, key and an index."""
    conn.execute(f'CREATE TABLE "{schema}".sqp (start_date date, asin text, search_query text, impressions bigint,'
                 " click_share numeric(38,9), median_price numeric(38,9), updated_at timestamptz,"
                 " PRIMARY KEY (start_date, asin, search_query))")
    conn.execute(f'CREATE INDEX sqp_by_asin ON "{schema}".sqp (asin, start_date)')


def force_dependency(conn: psycopg.Connection[Any], schema: str, parent: str, dependent: str,
                     kind: str = "hard") -> None:
    """Record a dependency straight in the registry, past the check that refuses a cycle (a registry edited by
    hand, or written by an older version): the night must still survive it."""
    conn.execute(
        f'INSERT INTO "{schema}".refresh_dependencies (parent_config_id, dependent_config_id, dependency_type)'  # noqa: S608
        f' SELECT p.id, d.id, %s FROM "{schema}".refresh_config p, "{schema}".refresh_config d'
        " WHERE p.table_name = %s AND d.table_name = %s", (kind, parent, dependent))
