"""Two runs of the same table never interleave: a PostgreSQL advisory lock per table."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from blocks.postgres import PostgresTarget
from bq_refresh.errors import AlreadyRunning


@contextmanager
def table_lock(target: PostgresTarget, table: str, wait_s: float) -> Iterator[None]:
    """Hold the table's advisory lock on a dedicated session for the whole run.

    Raises:
        AlreadyRunning: another run still held the lock after ``wait_s`` seconds.
    """
    conn = target.connect(autocommit=True)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            row = conn.execute("SELECT pg_try_advisory_lock(hashtext('bq-refresh:' || %s))", (table,)).fetchone()
            if row and row[0]:
                break
            if time.monotonic() >= deadline:
                raise AlreadyRunning(f"skipped: already running (lock still held after {wait_s:.0f} s)", table=table)
            time.sleep(0.2)
        yield
    finally:
        conn.close()  # closing the session releases the lock, even after a crash of this process
