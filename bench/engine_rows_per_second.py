"""Rows per second of one table read from the BigQuery emulator and published into PostgreSQL.

    .venv/bin/python -m bench.engine_rows_per_second --asins 100 --queries 500 --weeks 20   # 1M rows

Uses the real path (refresh-table flow: Storage Read, Polars, ADBC staging with checkpoints, publish,
audit) on the embedded default; prints the run's figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from bq_refresh.offline import configure_offline_prefect

configure_offline_prefect()


class RssSampler:
    """Samples this process's resident memory every 20 ms while the refresh runs."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.baseline = self._proc.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


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
    import gc

    gc.collect()
    sampler = RssSampler()
    t = time.perf_counter()
    with sampler:
        result = refresh_table("asin_performance_data", full_refresh=True, batch_size=args.batch_size)
        seconds = time.perf_counter() - t
    print(json.dumps({
        "rows": info["rows"], "prepare_s": round(prepared, 1), "refresh_s": round(seconds, 2),
        "rows_per_s": round(result["rows_read"] / seconds), "rows_read": result["rows_read"],
        "rows_inserted": result["rows_inserted"], "batches": result["batches"],
        "rss_before_mb": round(sampler.baseline / 2**20), "peak_rss_during_refresh_mb": round(sampler.peak / 2**20),
    }, indent=2))


if __name__ == "__main__":
    main()
