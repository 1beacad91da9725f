"""The embedded default: realistic SQP data in the local BigQuery emulator, refreshed into the embedded
PostgreSQL by the nightly flow, then a simulated next day (new week, restated week, deleted row, new column)."""

from __future__ import annotations

import io
import os
from datetime import UTC, date, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FIRST_SUNDAY = date(2025, 1, 5)
STAGES = ("impressions", "clicks", "cart_adds", "purchases")
SQP_KEY = ["start_date", "asin", "search_query"]


def _decimal(values: np.ndarray) -> pa.Array:
    """Exact NUMERIC values from floats rounded to 9 places (via their decimal text, not binary floats)."""
    return pa.array(np.char.mod("%.9f", values)).cast(pa.decimal128(38, 9))


def sqp_weeks(asins: int, queries: int, weeks: list[int], *, seed: int = 7, stamp: datetime | None = None) -> pa.Table:
    """Search Query Performance rows for the given week numbers, with the report's relations:
    ASIN count <= total count, share = ASIN / total, rate = total / volume, shipping counts <= total,
    impressions >= clicks >= cart adds >= purchases. Deterministic for a seed and week."""
    parts = []
    for week in weeks:
        rng = np.random.default_rng(seed * 100_003 + week)
        n = asins * queries
        asin_ix = np.repeat(np.arange(asins), queries)
        query_ix = np.tile(np.arange(queries), asins)
        volume = rng.integers(100, 60_000, n)
        totals = {"impressions": volume * rng.integers(8, 25, n)}
        totals["clicks"] = (totals["impressions"] * rng.uniform(0.01, 0.2, n)).astype(np.int64)
        totals["cart_adds"] = (totals["clicks"] * rng.uniform(0.05, 0.5, n)).astype(np.int64)
        totals["purchases"] = (totals["cart_adds"] * rng.uniform(0.1, 0.9, n)).astype(np.int64)
        start = FIRST_SUNDAY + timedelta(weeks=week)
        cols: dict[str, Any] = {
            "start_date": pa.array([start] * n, pa.date32()),
            "end_date": pa.array([start + timedelta(days=6)] * n, pa.date32()),
            "asin": pa.array(np.char.add("B0", np.char.zfill(asin_ix.astype(str), 8))),
            "search_query": pa.array(np.char.add("query ", query_ix.astype(str))),
            "search_query_score": pa.array(query_ix + 1, pa.int64()),
            "search_query_volume": pa.array(volume, pa.int64()),
        }
        for stage in STAGES:
            total = totals[stage]
            asin_count = (total * rng.uniform(0, 0.6, n)).astype(np.int64)
            share = np.where(total > 0, asin_count / np.maximum(total, 1), 0)
            cols[f"{stage}_total_count"] = pa.array(total, pa.int64())
            cols[f"{stage}_asin_count"] = pa.array(asin_count, pa.int64())
            cols[f"{stage}_asin_share"] = _decimal(share)
            if stage != "impressions":
                cols[f"{stage.rstrip('s') if stage != 'clicks' else 'click'}_rate"] = _decimal(total / volume)
                cols[f"{stage}_price_median"] = _decimal(np.round(rng.uniform(4.99, 199.99, n), 2))
                for speed, frac in (("same_day", 0.1), ("1d", 0.3), ("2d", 0.5)):
                    cols[f"{stage}_{speed}_shipping_count"] = pa.array((total * rng.uniform(0, frac, n)).astype(np.int64))
        cols["currency_code"] = pa.array(["USD"] * n)
        when = stamp or datetime(2025, 1, 1, tzinfo=UTC) + timedelta(weeks=week + 1)
        cols["updated_at"] = pa.array([when] * n, pa.timestamp("us", tz="UTC"))
        parts.append(pa.table(cols))
    return pa.concat_tables(parts)


def daily_rows(asins: int, days: int, *, seed: int = 11) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = asins * days
    day = np.tile(np.arange(days), asins)
    asin_ix = np.repeat(np.arange(asins), days)
    start = np.datetime64(FIRST_SUNDAY) + day
    return pa.table({
        "report_date": pa.array(start.astype("datetime64[D]").astype(date), pa.date32()),
        "asin": pa.array(np.char.add("B0", np.char.zfill(asin_ix.astype(str), 8))),
        "sessions": pa.array(rng.integers(10, 5000, n), pa.int64()),
        "units_ordered": pa.array(rng.integers(0, 200, n), pa.int64()),
        "revenue": _decimal(np.round(rng.uniform(0, 20000, n), 2)),
        "updated_at": pa.array([datetime(2025, 1, 1, tzinfo=UTC) + timedelta(days=int(d)) for d in day],
                               pa.timestamp("us", tz="UTC")),
    })


def bq_schema_of(table: pa.Table) -> list[Any]:
    from google.cloud import bigquery

    kinds = {pa.date32(): "DATE", pa.string(): "STRING", pa.int64(): "INT64", pa.decimal128(38, 9): "NUMERIC",
             pa.timestamp("us", tz="UTC"): "TIMESTAMP"}
    required = set(SQP_KEY) | {"report_date"}
    return [bigquery.SchemaField(f.name, kinds[f.type], mode="REQUIRED" if f.name in required else "NULLABLE")
            for f in table.schema]


def load_source(source: Any, name: str, data: pa.Table) -> None:
    """Replace a source table in BigQuery (explicit schema, resumable upload)."""
    from google.api_core.retry import Retry
    from google.cloud import bigquery

    client = source.get_bigquery_client()
    retry = Retry(timeout=30)
    client.create_dataset(source.dataset, exists_ok=True, retry=retry)
    ref = source.table_ref(name)
    client.delete_table(ref, not_found_ok=True, retry=retry)
    client.create_table(bigquery.Table(ref, schema=bq_schema_of(data)), retry=retry)
    buf = io.BytesIO()
    pq.write_table(data, buf)
    buf.seek(0)
    client.load_table_from_file(buf, ref, job_config=bigquery.LoadJobConfig(source_format="PARQUET")).result(
        timeout=600, retry=retry)


def summaries_sql(s: str) -> list[str]:
    """The dashboards' summaries as materialized views over the base tables (a chain: weekly -> monthly ->
    quarterly -> yearly), each with a unique index so it refreshes CONCURRENTLY."""
    return [
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {s}.weekly_summary AS
            SELECT start_date, asin, sum(impressions_total_count) AS impressions, sum(clicks_asin_count) AS clicks,
                   sum(cart_adds_asin_count) AS cart_adds, sum(purchases_asin_count) AS purchases
              FROM {s}.asin_performance_data GROUP BY start_date, asin""",
        f"CREATE UNIQUE INDEX IF NOT EXISTS weekly_summary_key ON {s}.weekly_summary (start_date, asin)",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {s}.monthly_summary AS
            SELECT date_trunc('month', start_date)::date AS month, asin, sum(impressions) AS impressions,
                   sum(clicks) AS clicks, sum(cart_adds) AS cart_adds, sum(purchases) AS purchases
              FROM {s}.weekly_summary GROUP BY 1, 2""",
        f"CREATE UNIQUE INDEX IF NOT EXISTS monthly_summary_key ON {s}.monthly_summary (month, asin)",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {s}.quarterly_summary AS
            SELECT date_trunc('quarter', month)::date AS quarter, asin, sum(impressions) AS impressions,
                   sum(clicks) AS clicks, sum(purchases) AS purchases FROM {s}.monthly_summary GROUP BY 1, 2""",
        f"CREATE UNIQUE INDEX IF NOT EXISTS quarterly_summary_key ON {s}.quarterly_summary (quarter, asin)",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {s}.yearly_summary AS
            SELECT date_trunc('year', quarter)::date AS year, asin, sum(impressions) AS impressions,
                   sum(clicks) AS clicks, sum(purchases) AS purchases FROM {s}.quarterly_summary GROUP BY 1, 2""",
        f"CREATE UNIQUE INDEX IF NOT EXISTS yearly_summary_key ON {s}.yearly_summary (year, asin)",
        f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {s}.search_performance_summary AS
            SELECT search_query, sum(search_query_volume) AS volume, sum(purchases_total_count) AS purchases
              FROM {s}.search_query_performance GROUP BY search_query""",
        f"CREATE UNIQUE INDEX IF NOT EXISTS search_performance_summary_key ON {s}.search_performance_summary (search_query)",
    ]


def register_demo_tables(conn: Any, schema: str, source: Any) -> None:
    from tasks.registry import add_dependency, register_table

    register_table(conn, schema, "asin_performance_data", {
        "source": "asin_performance_data", "key": SQP_KEY, "cursor": "updated_at", "lookback": "7d",
        "mode": "window", "window_column": "start_date", "critical_fields": ["purchases_asin_count", "click_rate"],
        "checks": {"ranges": {"impressions_asin_share": [0, 1], "clicks_asin_share": [0, 1]},
                   "not_greater_than": [["clicks_asin_count", "clicks_total_count"],
                                        ["purchases_total_count", "clicks_total_count"]]},
    }, priority=100)
    query = (f"SELECT start_date, search_query, SUM(search_query_volume) AS search_query_volume, "
             f"SUM(purchases_total_count) AS purchases_total_count, MAX(updated_at) AS updated_at "
             f"FROM `{source.table_ref('asin_performance_data')}` GROUP BY start_date, search_query")
    register_table(conn, schema, "search_query_performance", {
        "query": query, "key": ["start_date", "search_query"], "mode": "full",
        "delete_policy": {"max_delete_fraction": 1.0},
    }, priority=95)
    register_table(conn, schema, "daily_sqp_data", {
        "source": "daily_sqp_data", "key": ["report_date", "asin"], "cursor": "updated_at",
        "delete_policy": {"mode": "hard"},
    }, priority=85)
    add_dependency(conn, schema, "asin_performance_data", "search_query_performance", "soft")
    add_dependency(conn, schema, "asin_performance_data", "daily_sqp_data", "soft")


def prepare_demo(state_dir: Any, asins: int, queries: int, weeks: int, reset: bool) -> dict[str, Any]:
    """Start the emulator and the embedded PostgreSQL, load the source, apply the schema, register."""
    from psycopg import sql

    from blocks import BigQuerySource, resolve_resources
    from bq_refresh.services import start_emulator, stop_emulator
    from bq_refresh.settings import load_settings
    from tasks.migrations import apply_migrations

    if reset:
        stop_emulator(state_dir)
    settings = load_settings()
    endpoints = start_emulator(state_dir, settings.bigquery_project_id, persistent=not reset)
    os.environ["BIGQUERY_API_ENDPOINT"] = endpoints.rest_url
    os.environ["BIGQUERY_STORAGE_ENDPOINT"] = endpoints.grpc_target
    settings = load_settings()
    source = BigQuerySource.from_settings(settings)
    data = sqp_weeks(asins, queries, list(range(weeks)))
    load_source(source, "asin_performance_data", data)
    load_source(source, "daily_sqp_data", daily_rows(asins, weeks * 7))
    res = resolve_resources(settings)
    with res.target.connect(autocommit=True) as conn:
        if reset:
            for name in (settings.schema_name, settings.staging_schema, settings.shadow_schema):
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        apply_migrations(conn, settings.schema_name, settings.staging_schema)
        register_demo_tables(conn, settings.schema_name, source)
    return {"rows": data.num_rows, "emulator": endpoints.rest_url}


def create_summaries(schema: str) -> None:
    from psycopg import sql

    from blocks import resolve_resources
    from bq_refresh.settings import load_settings

    res = resolve_resources(load_settings())
    s = sql.Identifier(schema).as_string(None)
    with res.target.connect(autocommit=True) as conn:
        for statement in summaries_sql(s):
            conn.execute(statement.encode())


def simulate_next_day(asins: int, queries: int, weeks: int) -> dict[str, Any]:
    """In the source: a new week, a restated last week (changed values, one row gone), a deleted daily
    row, and a new nullable column."""
    from blocks import BigQuerySource
    from bq_refresh.settings import load_settings

    source = BigQuerySource.from_settings(load_settings())
    restate_stamp = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(weeks=weeks + 1, days=1)
    old = sqp_weeks(asins, queries, list(range(weeks - 1)))
    restated = sqp_weeks(asins, queries, [weeks - 1], seed=8, stamp=restate_stamp).slice(1)  # one row gone
    new_week = sqp_weeks(asins, queries, [weeks])
    data = pa.concat_tables([old, restated, new_week])
    brand = pc.if_else(pc.equal(pc.utf8_slice_codeunits(data.column("asin"), 9, 10), "0"), None, "Acme")
    data = data.append_column("brand", brand)
    load_source(source, "asin_performance_data", data)
    daily = daily_rows(asins, weeks * 7)
    load_source(source, "daily_sqp_data", daily.slice(1))  # the first daily row was deleted upstream
    return {"new_week_rows": new_week.num_rows, "restated_rows": restated.num_rows, "source_rows": data.num_rows}
