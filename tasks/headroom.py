"""Disk headroom of the target database: what PostgreSQL tells of its use, the budget the user knows
(REFRESH_DISK_BUDGET_MB), and the refusal of a full or initial load that would not fit in it.

A Supabase database that fills its disk goes read-only, and staging, a full reload and the old versions of updated
rows can need about twice a table's size. PostgreSQL does not report a disk's free space over SQL, to any role:
``pg_database_size`` and ``pg_total_relation_size`` say what the database and a table use (any role that may
connect), ``pg_ls_waldir`` what the WAL uses (superuser or pg_monitor); ``pg_ls_dir`` and ``pg_stat_file`` list
files and their sizes (superuser unless granted) and say nothing of free space either. Only a program run on the
server could (``COPY ... FROM PROGRAM 'df'``, superuser), which the refresh never does. So the headroom is the
budget minus the use, and it is unknown without a budget: then nothing is refused and ``doctor`` says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors

from bq_refresh.errors import DiskBudgetExceeded
from tasks.registry import list_entries
from tasks.sqlnames import ident

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# What a row costs in PostgreSQL beyond its values: tuple header (24 bytes) and line pointer (4), alignment, and
# its primary-key index entry. BigQuery's byte counts are of the values alone.
ROW_OVERHEAD_BYTES = 64


def mib(n: float) -> str:
    return f"{n / MIB:,.1f} MB"


def budget_setting(budget_mb: float) -> str:
    """The setting as a user writes it: REFRESH_DISK_BUDGET_MB=8192."""
    return f"REFRESH_DISK_BUDGET_MB={int(budget_mb) if budget_mb == int(budget_mb) else budget_mb}"


@dataclass(frozen=True)
class DiskUse:
    """What the database uses, as far as this role may know, against the budget (None: no budget set)."""

    database_bytes: int
    wal_bytes: int | None  # None: pg_ls_waldir() refused (superuser or pg_monitor only)
    budget_bytes: int | None

    @property
    def used_bytes(self) -> int:
        return self.database_bytes + (self.wal_bytes or 0)

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.budget_bytes is None else self.budget_bytes - self.used_bytes

    def describe(self) -> str:
        wal = (f" + WAL {mib(self.wal_bytes)}" if self.wal_bytes is not None
               else " (WAL not counted: pg_ls_waldir() needs superuser or pg_monitor)")
        return f"{mib(self.used_bytes)} used: database {mib(self.database_bytes)}{wal}"


def disk_use(conn: psycopg.Connection[Any], budget_mb: float | None) -> DiskUse:
    """The database's size and, where this role may read it, the WAL's."""
    row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    wal: int | None = None
    try:
        with conn.transaction():  # a savepoint inside a caller's transaction: a refusal must not end it
            found = conn.execute("SELECT coalesce(sum(size), 0) FROM pg_ls_waldir()").fetchone()
            wal = int(found[0]) if found else None
    except errors.InsufficientPrivilege:
        wal = None
    return DiskUse(int(row[0]), wal, None if budget_mb is None else int(budget_mb * MIB))


def load_need(*, target_bytes: int, empty: bool, direct: bool, source_rows: int, source_bytes: int) -> int | None:
    """Bytes a full or initial load may take while it runs (None: unknown).

    A table with rows: staging holds what is read (at least the table's size again), and each row the publish
    updates leaves its old version until VACUUM (up to the table's size): the larger of the two, plus the table.
    An empty table: what the source's rows take in PostgreSQL (BigQuery's bytes + ROW_OVERHEAD_BYTES a row), once
    for the direct load, twice through staging. Unknown when the source says nothing of its size.
    """
    incoming = source_bytes + source_rows * ROW_OVERHEAD_BYTES if (source_bytes or source_rows) else None
    if empty:
        return None if incoming is None else incoming * (1 if direct else 2)
    return max(incoming or 0, target_bytes) + target_bytes


def table_bytes(conn: psycopg.Connection[Any], schema: str, table: str) -> int:
    """pg_total_relation_size of a table (its indexes and TOAST included); 0 when it does not exist."""
    row = conn.execute("SELECT coalesce(pg_total_relation_size(to_regclass(%s)), 0)",
                       (ident(schema, table).as_string(conn),)).fetchone()
    return int(row[0]) if row else 0


def check_load_fits(conn: psycopg.Connection[Any], *, table: str, target_schema: str, target_table: str,
                    empty: bool, direct: bool, source_rows: int, source_bytes: int, budget_mb: float | None) -> None:
    """Refuse a full or initial load whose estimated need exceeds the headroom under ``budget_mb``.

    Nothing is checked without a budget (the headroom is unknown) or when the need is unknown.

    Raises:
        DiskBudgetExceeded: naming the table, the estimate, the budget and what the database uses.
    """
    if budget_mb is None:
        return
    target_bytes = 0 if empty else table_bytes(conn, target_schema, target_table)
    need = load_need(target_bytes=target_bytes, empty=empty, direct=direct, source_rows=source_rows,
                     source_bytes=source_bytes)
    if need is None:
        log.info("%s: the source says nothing of its size; the disk need of this load is unknown", table)
        return
    use = disk_use(conn, budget_mb)
    headroom = use.headroom_bytes
    assert headroom is not None
    if need <= headroom:
        return
    if empty:
        how = (f"an initial load needs about {mib(need)} (the source's {source_rows:,} rows, {mib(source_bytes)} in"
               f" BigQuery, + {ROW_OVERHEAD_BYTES} bytes a row" + (")" if direct else "; staged, then copied: twice)"))
    else:
        how = (f"a full reload needs about {mib(need)} ({target_schema}.{target_table} takes {mib(target_bytes)}:"
               " staging and the old versions of updated rows take about as much again)")
    left = f"leaves {mib(headroom)}" if headroom > 0 else "is used up already"
    raise DiskBudgetExceeded(
        f"{how}, but {budget_setting(budget_mb)} {left} ({use.describe()}); nothing was loaded. Free space"
        " (VACUUM FULL, drop what is no longer needed) or grow the disk and REFRESH_DISK_BUDGET_MB with it",
        table=table, need_bytes=need, headroom_bytes=headroom, budget_mb=budget_mb)


def registered_targets(conn: psycopg.Connection[Any], registry_schema: str) -> list[tuple[str, str]]:
    """(schema, table) of every registered table's target; none before ``init``."""
    row = conn.execute("SELECT to_regclass(%s)", (ident(registry_schema, "refresh_config").as_string(conn),)).fetchone()
    if row is None or row[0] is None:
        return []
    targets = []
    for entry in list_entries(conn, registry_schema):
        target = entry.spec().target
        targets.append((target.split(".", 1)[0], target.split(".", 1)[1]) if target
                       else (entry.table_schema, entry.table_name))
    return targets


def disk_report(conn: psycopg.Connection[Any], targets: list[tuple[str, str]], budget_mb: float | None,
                ) -> dict[str, Any]:
    """``bq-refresh doctor``'s disk line: use, budget, headroom, and whether the largest of ``targets``
    (schema, table) could be reloaded in full; ``status`` (see ``judge``) and ``message``, and the figures."""
    use = disk_use(conn, budget_mb)
    size, largest = max(((table_bytes(conn, s, t), f"{s}.{t}") for s, t in targets), default=(0, None))
    status, message = judge(use, largest, size)
    return {"name": "disk", "status": status, "message": message, "database_bytes": use.database_bytes,
            "wal_bytes": use.wal_bytes, "budget_bytes": use.budget_bytes, "headroom_bytes": use.headroom_bytes,
            "largest_target": largest, "largest_target_bytes": size if largest else None,
            "full_reload_need_bytes": 2 * size if largest else None}


def judge(use: DiskUse, largest: str | None, largest_bytes: int) -> tuple[str, str]:
    """(status, message) of the disk line: ``unknown`` without a budget (the free space cannot be read), ``fail``
    when the database already uses more than the budget, ``warn`` when a full reload of the largest target would
    be refused, else ``ok``."""
    need = 2 * largest_bytes  # load_need of a table with rows whose source size is not asked here
    reload = (f"; a full reload of the largest target, {largest} ({mib(largest_bytes)}), needs about {mib(need)}"
              if largest else "")
    headroom = use.headroom_bytes
    budget = budget_setting(use.budget_bytes / MIB) if use.budget_bytes is not None else ""
    if headroom is None:
        return "unknown", (f"{use.describe()}{reload}; free space unknown: PostgreSQL does not report a disk's free"
                           " space over SQL; set REFRESH_DISK_BUDGET_MB to the database's disk size (the plan's)")
    if headroom < 0:
        return "fail", (f"{use.describe()}, over {budget} by {mib(-headroom)}: every full or initial load is"
                        " refused; free space or grow the disk")
    if largest and need > headroom:
        return "warn", (f"headroom {mib(headroom)} of {budget} ({use.describe()}){reload}, more than the headroom:"
                        " it would be refused")
    return "ok", f"headroom {mib(headroom)} of {budget} ({use.describe()}){reload}"
