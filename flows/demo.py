"""The embedded default: SQP-shaped data in the local BigQuery emulator, refreshed into the embedded PostgreSQL."""

from __future__ import annotations

import io
import os
import random
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SQP_FIELDS = [
    ("start_date", "DATE", "REQUIRED"), ("end_date", "DATE", "NULLABLE"), ("asin", "STRING", "REQUIRED"),
    ("search_query", "STRING", "REQUIRED"), ("search_query_volume", "INT64", "NULLABLE"),
    ("impressions_total_count", "INT64", "NULLABLE"), ("impressions_asin_count", "INT64", "NULLABLE"),
    ("impressions_asin_share", "NUMERIC", "NULLABLE"), ("clicks_total_count", "INT64", "NULLABLE"),
    ("clicks_asin_count", "INT64", "NULLABLE"), ("click_rate", "NUMERIC", "NULLABLE"),
    ("purchases_total_count", "INT64", "NULLABLE"), ("median_price", "NUMERIC", "NULLABLE"),
    ("currency", "STRING", "NULLABLE"), ("updated_at", "TIMESTAMP", "NULLABLE"),
]
SQP_KEY = ["start_date", "asin", "search_query"]


def sqp_table(asins: int, queries: int, weeks: int, *, seed: int = 7) -> pa.Table:
    """Generate SQP rows with the report's relations (ASIN count <= total, share = ASIN / total)."""
    rng = random.Random(seed)
    first_sunday = date(2025, 1, 5)
    cols: dict[str, list[Any]] = {name: [] for name, _, _ in SQP_FIELDS}
    stamp = datetime(2025, 3, 1, tzinfo=UTC)
    q = Decimal("0.000000001")
    for w in range(weeks):
        start = first_sunday + timedelta(weeks=w)
        for a in range(asins):
            for s in range(queries):
                volume = rng.randint(50, 50_000)
                impressions = rng.randint(volume, volume * 20)
                imp_asin = rng.randint(0, impressions)
                clicks = rng.randint(0, impressions // 5)
                purchases = rng.randint(0, clicks // 3 if clicks >= 3 else 0)
                for name, value in (
                    ("start_date", start), ("end_date", start + timedelta(days=6)), ("asin", f"B0{a:08d}"),
                    ("search_query", f"query {s}"), ("search_query_volume", volume),
                    ("impressions_total_count", impressions), ("impressions_asin_count", imp_asin),
                    ("impressions_asin_share", (Decimal(imp_asin) / Decimal(impressions)).quantize(q)),
                    ("clicks_total_count", clicks), ("clicks_asin_count", rng.randint(0, clicks)),
                    ("click_rate", (Decimal(clicks) / Decimal(volume)).quantize(q)),
                    ("purchases_total_count", purchases),
                    ("median_price", Decimal(rng.randint(499, 19999)) / 100), ("currency", "USD"),
                    ("updated_at", stamp + timedelta(weeks=w)),
                ):
                    cols[name].append(value)
    types = {"DATE": pa.date32(), "STRING": pa.string(), "INT64": pa.int64(), "NUMERIC": pa.decimal128(38, 9),
             "TIMESTAMP": pa.timestamp("us", tz="UTC")}
    return pa.table({name: pa.array(cols[name], types[kind]) for name, kind, _ in SQP_FIELDS})


def load_source(source: Any, name: str, data: pa.Table) -> None:
    """Replace a source table in the emulator (explicit schema, resumable upload)."""
    from google.api_core.retry import Retry
    from google.cloud import bigquery

    client = source.get_bigquery_client()
    retry = Retry(timeout=30)
    client.create_dataset(source.dataset, exists_ok=True, retry=retry)
    ref = source.table_ref(name)
    client.delete_table(ref, not_found_ok=True, retry=retry)
    schema = [bigquery.SchemaField(n, t, mode=m) for n, t, m in SQP_FIELDS]
    client.create_table(bigquery.Table(ref, schema=schema), retry=retry)
    buf = io.BytesIO()
    pq.write_table(data, buf)
    buf.seek(0)
    client.load_table_from_file(buf, ref, job_config=bigquery.LoadJobConfig(source_format="PARQUET")).result(
        timeout=300, retry=retry)


def prepare_demo(state_dir: Any, asins: int, queries: int, weeks: int, reset: bool) -> dict[str, Any]:
    """Start the emulator and the embedded PostgreSQL, load the source, apply the schema, register."""
    from blocks import BigQuerySource, resolve_resources
    from bq_refresh.services import start_emulator, stop_emulator
    from bq_refresh.settings import load_settings
    from tasks.migrations import apply_migrations
    from tasks.registry import register_table

    if reset:
        stop_emulator(state_dir)
    settings = load_settings()
    endpoints = start_emulator(state_dir, settings.bigquery_project_id)
    os.environ["BIGQUERY_API_ENDPOINT"] = endpoints.rest_url
    os.environ["BIGQUERY_STORAGE_ENDPOINT"] = endpoints.grpc_target
    settings = load_settings()
    source = BigQuerySource.from_settings(settings)
    data = sqp_table(asins, queries, weeks)
    load_source(source, "asin_performance_data", data)
    res = resolve_resources(settings)
    with res.target.connect(autocommit=True) as conn:
        if reset:
            from psycopg import sql

            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(settings.schema_name)))
        apply_migrations(conn, settings.schema_name)
        register_table(conn, settings.schema_name, "asin_performance_data", {
            "source": "asin_performance_data", "key": SQP_KEY, "cursor": "updated_at", "lookback": "7d",
            "mode": "window", "window_column": "start_date",
        }, priority=100)
    return {"rows": data.num_rows, "emulator": endpoints.rest_url}
