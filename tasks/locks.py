"""Two runs of the same table never interleave: a PostgreSQL advisory lock per table."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from blocks.postgres import PostgresTarget
from bq_refresh.errors import AlreadyRunning

_TRY = "SELECT pg_try_advisory_lock(hashtext('bq-refresh:' || %s))"


class TableLock:
    """The advisory lock of one table, held by a dedicated session for the whole run."""

    def __init__(self, target: PostgresTarget, table: str) -> None:
        self.target = target
        self.table = table
        self.conn: psycopg.Connection[Any] | None = None
        self.reacquired = 0

    def acquire(self, wait_s: float) -> None:
        conn = self.target.connect(autocommit=True)
        deadline = time.monotonic() + wait_s
        while True:
            row = conn.execute(_TRY, (self.table,)).fetchone()
            if row and row[0]:
                self.conn = conn
                return
            if time.monotonic() >= deadline:
                conn.close()
                raise AlreadyRunning(f"skipped: already running (lock still held after {wait_s:.0f} s)", table=self.table)
            time.sleep(0.2)

    def ensure(self) -> None:
        """Check the session still holds the lock; after a lost connection (a PostgreSQL restart), take it
        again, or stop the run if another run took it meanwhile.

        Raises:
            AlreadyRunning: the lock was lost and another run holds it now.
        """
        if self.conn is not None:
            try:
                self.conn.execute("SELECT 1")
                return
            except psycopg.Error:
                self.release()
        try:
            self.acquire(0)
        except AlreadyRunning:
            raise AlreadyRunning("stopped: the table lock was lost (database connection dropped) and another run "
                                 "holds it now; this run's staged batches are resumed by that run",
                                 table=self.table) from None
        self.reacquired += 1

    def release(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()  # closing the session releases the lock, even after a crash of this process
            finally:
                self.conn = None


@contextmanager
def table_lock(target: PostgresTarget, table: str, wait_s: float) -> Iterator[TableLock]:
    """Hold the table's advisory lock on a dedicated session for the whole run.

    Raises:
        AlreadyRunning: another run still held the lock after ``wait_s`` seconds.
    """
    lock = TableLock(target, table)
    lock.acquire(wait_s)
    try:
        yield lock
    finally:
        lock.release()
