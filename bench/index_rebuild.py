"""Does dropping and rebuilding secondary indexes speed up a bulk publish? (issue: bulk reloads)

    .venv/bin/python -m bench.index_rebuild --rows 1000000

Publishes N SQP-shaped staged rows into an empty target with a primary key and one secondary index
(asin, start_date), two ways, interleaved, 3 times each: (a) INSERT ... ON CONFLICT with the index in
place; (b) DROP the secondary index, the same INSERT, CREATE INDEX. Prints the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import psycopg

from bq_refresh.offline import configure_offline_prefect

configure_offline_prefect()

STAGE = """
CREATE UNLOGGED TABLE bench_ix.staging AS
SELECT date '2025-01-05' + (i %% 52) * 7 AS start_date, 'B0' || lpad((i %% 1000)::text, 8, '0') AS asin,
       'query ' || i::text AS search_query, (i * 7 %% 100000)::bigint AS impressions,
       ((i %% 1000) / 1000.0)::numeric(38,9) AS click_share, (19.99 + i %% 500)::numeric(38,9) AS median_price,
       now() AS updated_at
  FROM generate_series(0, %s - 1) i
"""
TARGET = """
CREATE TABLE bench_ix.target (start_date date, asin text, search_query text, impressions bigint,
    click_share numeric(38,9), median_price numeric(38,9), updated_at timestamptz,
    PRIMARY KEY (start_date, asin, search_query))
"""
INSERT = """
INSERT INTO bench_ix.target SELECT * FROM bench_ix.staging
ON CONFLICT (start_date, asin, search_query) DO UPDATE SET impressions = EXCLUDED.impressions
"""


def run(conn: psycopg.Connection, rebuild: bool) -> float:  # type: ignore[type-arg]
    conn.execute("DROP TABLE IF EXISTS bench_ix.target")
    conn.execute(TARGET)
    conn.execute("CREATE INDEX target_asin ON bench_ix.target (asin, start_date)")
    conn.commit()
    started = time.perf_counter()
    if rebuild:
        conn.execute("DROP INDEX bench_ix.target_asin")
    conn.execute(INSERT)
    if rebuild:
        conn.execute("CREATE INDEX target_asin ON bench_ix.target (asin, start_date)")
    conn.commit()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    from blocks import resolve_resources
    from bq_refresh.settings import load_settings

    res = resolve_resources(load_settings())
    with res.target.connect() as conn:
        conn.execute("DROP SCHEMA IF EXISTS bench_ix CASCADE")
        conn.execute("CREATE SCHEMA bench_ix")
        conn.execute(STAGE, (args.rows,))
        conn.commit()
        times: dict[str, list[float]] = {"index_in_place": [], "drop_and_rebuild": []}
        for _ in range(3):
            times["index_in_place"].append(run(conn, False))
            times["drop_and_rebuild"].append(run(conn, True))
        conn.execute("DROP SCHEMA bench_ix CASCADE")
        conn.commit()
    medians = {k: round(statistics.median(v), 2) for k, v in times.items()}
    print(json.dumps({"rows": args.rows, "median_s": medians, "all_s": times,
                      "gain": round(1 - medians["drop_and_rebuild"] / medians["index_in_place"], 3)}, indent=2))


if __name__ == "__main__":
    main()
