"""SQP-shaped benchmark data: 29 columns (NUMERIC shares, rates and prices), key (start_date, asin,
search_query), generated vectorised and deterministically, written once to Parquet per row count.

The reload file holds the same keys; 10% of the rows (every row whose index is 0 mod 10) have new counts,
shares and prices and a new updated_at; the other 90% are byte-identical (Amazon restates a whole week,
most rows of which did not change).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

KEY = ["start_date", "asin", "search_query"]
INDEX = ["asin", "start_date"]
DEC = pa.decimal128(38, 9)
COLUMNS: list[tuple[str, str]] = [  # (name, PostgreSQL type)
    ("start_date", "date"), ("end_date", "date"), ("asin", "text"), ("search_query", "text"),
    ("search_query_score", "bigint"), ("search_query_volume", "bigint"),
    ("impressions_total", "bigint"), ("impressions_asin", "bigint"), ("impressions_share", "numeric(38,9)"),
    ("clicks_total", "bigint"), ("clicks_asin", "bigint"), ("clicks_share", "numeric(38,9)"),
    ("click_rate", "numeric(38,9)"),
    ("cart_adds_total", "bigint"), ("cart_adds_asin", "bigint"), ("cart_adds_share", "numeric(38,9)"),
    ("purchases_total", "bigint"), ("purchases_asin", "bigint"), ("purchases_share", "numeric(38,9)"),
    ("purchase_rate", "numeric(38,9)"),
    ("median_price_total", "numeric(38,9)"), ("median_price_asin", "numeric(38,9)"), ("currency", "text"),
    ("same_day_shipping", "bigint"), ("one_day_shipping", "bigint"), ("two_day_shipping", "bigint"),
    ("marketplace", "text"), ("reporting_date", "date"), ("updated_at", "timestamp with time zone"),
]
ASINS = 1000
WEEK0 = date(2024, 1, 7)
T0 = datetime(2025, 1, 1, 3, 0)


def _dec(values: np.ndarray) -> pa.Array:
    """float64 -> decimal128(38, 9), exactly: integer units of 1e-9 written as 128-bit two's complement."""
    units = np.round(values * 1e9).astype(np.int64)
    raw = np.stack([units, units >> 63], axis=1).astype("<i8").tobytes()
    return pa.Array.from_buffers(DEC, len(units), [None, pa.py_buffer(raw)])


def batch(start: int, stop: int, *, changed: bool) -> pa.RecordBatch:
    """Rows [start, stop) of the dataset; ``changed`` = the reload version (10% of rows differ)."""
    i = np.arange(start, stop, dtype=np.int64)
    week = i // (ASINS * 50)
    asin_n = (i // 50) % ASINS
    query_n = i % 50 + (week % 7) * 50
    start_date = np.datetime64(WEEK0, "D") + (week * 7).astype("timedelta64[D]")
    base = (i * 2654435761) % 1_000_003  # a fixed pseudo-random per row, independent of batching
    bump = np.where(changed & (i % 10 == 0), 7, 0)
    volume = 1000 + base % 50_000 + bump
    impressions_total = volume * 3 + base % 997
    impressions_asin = impressions_total // (2 + base % 7)
    clicks_total = impressions_total // (5 + base % 11)
    clicks_asin = clicks_total // (2 + base % 5)
    carts_total = clicks_total // (3 + base % 4)
    carts_asin = carts_total // (2 + base % 3)
    purch_total = carts_total // (2 + base % 5)
    purch_asin = purch_total // (2 + base % 2)
    price_total = 5 + (base % 20_000) / 100 + bump / 100
    price_asin = price_total * (0.8 + (base % 40) / 100)
    updated = np.where(changed & (i % 10 == 0), 1, 0)

    def share(a: np.ndarray, b: np.ndarray) -> pa.Array:
        return _dec(np.divide(a, np.maximum(b, 1)))

    cols = {
        "start_date": pa.array(start_date, pa.date32()),
        "end_date": pa.array(start_date + np.timedelta64(6, "D"), pa.date32()),
        "asin": pa.array([f"B0{n:08d}" for n in asin_n], pa.string()),
        "search_query": pa.array([f"search query {n}" for n in query_n], pa.string()),
        "search_query_score": pa.array(1 + base % 100, pa.int64()),
        "search_query_volume": pa.array(volume, pa.int64()),
        "impressions_total": pa.array(impressions_total, pa.int64()),
        "impressions_asin": pa.array(impressions_asin, pa.int64()),
        "impressions_share": share(impressions_asin, impressions_total),
        "clicks_total": pa.array(clicks_total, pa.int64()),
        "clicks_asin": pa.array(clicks_asin, pa.int64()),
        "clicks_share": share(clicks_asin, clicks_total),
        "click_rate": share(clicks_total, volume),
        "cart_adds_total": pa.array(carts_total, pa.int64()),
        "cart_adds_asin": pa.array(carts_asin, pa.int64()),
        "cart_adds_share": share(carts_asin, carts_total),
        "purchases_total": pa.array(purch_total, pa.int64()),
        "purchases_asin": pa.array(purch_asin, pa.int64()),
        "purchases_share": share(purch_asin, purch_total),
        "purchase_rate": share(purch_total, volume),
        "median_price_total": _dec(price_total),
        "median_price_asin": _dec(price_asin),
        "currency": pa.array(["USD"] * len(i), pa.string()),
        "same_day_shipping": pa.array(purch_asin // 3, pa.int64()),
        "one_day_shipping": pa.array(purch_asin // 2, pa.int64()),
        "two_day_shipping": pa.array(purch_asin - purch_asin // 3 - purch_asin // 2, pa.int64()),
        "marketplace": pa.array(["ATVPDKIKX0DER"] * len(i), pa.string()),
        "reporting_date": pa.array(start_date + np.timedelta64(8, "D"), pa.date32()),
        "updated_at": pa.array(np.datetime64(T0, "us") + (updated * 86_400_000_000 + i % 1_000_000).astype("timedelta64[us]"),
                               pa.timestamp("us", tz="UTC")),
    }
    return pa.RecordBatch.from_pydict(cols)


def write(path: Path, rows: int, *, changed: bool, batch_rows: int = 100_000) -> Path:
    """Write the dataset to ``path`` (Parquet, one row group per batch) unless it is there already."""
    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    writer: pq.ParquetWriter | None = None
    for start in range(0, rows, batch_rows):
        b = batch(start, min(rows, start + batch_rows), changed=changed)
        if writer is None:
            writer = pq.ParquetWriter(tmp, b.schema, compression="zstd")
        writer.write_batch(b)
    assert writer is not None
    writer.close()
    tmp.rename(path)
    return path


def read(path: Path, batch_rows: int = 50_000, *, part: int = 0, parts: int = 1) -> Iterator[pa.RecordBatch]:
    """Stream the file's batches (every ``parts``-th row group from ``part``: a stream of ``parts``)."""
    f = pq.ParquetFile(path)
    # One row group at a time, decoded batch by batch: asked for many row groups at once, the reader
    # prefetches all of them (the 10M-row file's half: ~450 MB of this process's RSS in the first --big run).
    for g in range(part, f.num_row_groups, parts):
        yield from f.iter_batches(batch_size=batch_rows, row_groups=[g])


def create_table_sql(schema: str, table: str, *, indexes: bool = True, unlogged: bool = False) -> list[str]:
    cols = ", ".join(f'"{n}" {t}' + (" NOT NULL" if n in KEY else "") for n, t in COLUMNS)
    pk = f', PRIMARY KEY ({", ".join(KEY)})' if indexes else ""
    out = [f'CREATE {"UNLOGGED " if unlogged else ""}TABLE "{schema}"."{table}" ({cols}{pk})']
    if indexes:
        out.append(f'CREATE INDEX ON "{schema}"."{table}" ({", ".join(INDEX)})')
    return out
