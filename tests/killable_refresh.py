"""Run one refresh in a child process that the test kills with SIGKILL mid-load.

A registered transform sleeps a little per batch so the test can catch the load half-way.
"""

from __future__ import annotations

import sys
import time

import polars as pl

from tasks.transform import register_transform


@register_transform("slow_for_tests")
def _slow(frame: pl.LazyFrame) -> pl.LazyFrame:
    time.sleep(0.15)
    return frame


if __name__ == "__main__":
    if sys.argv[1] == "--nightly":  # the parent flow, every table forced (publish groups publish there)
        from flows.daily_refresh import daily_refresh

        daily_refresh(force=True)
    elif sys.argv[1] == "--repair-keys":  # verify --repair's run by key: table, then the keys as JSON
        import json

        from flows.refresh_table import refresh_table

        refresh_table(sys.argv[2], repair_keys=json.loads(sys.argv[3]))
    else:
        from flows.refresh_table import refresh_table

        refresh_table(sys.argv[1])
