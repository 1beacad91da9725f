"""Rows per second of one table read from the BigQuery emulator and published into PostgreSQL.

    .venv/bin/python -m bench.engine_rows_per_second --asins 100 --queries 500 --weeks 20   # 1M rows

Uses the real path (refresh-table flow: Storage Read, Polars, ADBC staging with checkpoints, publish,
audit) on the embedded default; prints the run's figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

from bq_refresh.offline import configure_offline_prefect

configure_offline_prefect()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--asins", type=int, default=100)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--weeks", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()

    from bq_refresh.settings import load_settings
    from flows.demo import prepare_demo
    from flows.refresh_table import refresh_table

    settings = load_settings()
    t = time.perf_counter()
    info = prepare_demo(settings.state_dir, args.asins, args.queries, args.weeks, reset=True)
    prepared = time.perf_counter() - t
    t = time.perf_counter()
    result = refresh_table("asin_performance_data", full_refresh=True, batch_size=args.batch_size)
    seconds = time.perf_counter() - t
    print(json.dumps({
        "rows": info["rows"], "prepare_s": round(prepared, 1), "refresh_s": round(seconds, 2),
        "rows_per_s": round(result["rows_read"] / seconds), "rows_read": result["rows_read"],
        "rows_inserted": result["rows_inserted"], "batches": result["batches"],
    }, indent=2))


if __name__ == "__main__":
    main()
