"""Reconciliation: what the source holds per slice at the read snapshot, which periods a window-mode run
must read whole, and the proof inside the publish transaction that the target holds exactly that. The counts'
SQL on both sides is tasks/digest.py's (the one module that counts and digests slices); the decisions are here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import psycopg
from psycopg import sql

from blocks.resources import Resources
from bq_refresh.errors import QualityCheckFailed
from tasks import digest
from tasks.extract import bq_ident
from tasks.restriction import NO_ROW, Cond, Restriction, any_of, query_where
from tasks.sqlnames import ident


@dataclass(frozen=True)
class SourceSlice:
    """One period of the source (or the whole table: ``period`` None and ``whole`` True) at the snapshot."""

    period: str | None  # period_text of the window value; None = NULL period (or the whole table)
    rows: int
    keys: int  # distinct keys without a NULL: the rows the target must hold for this slice
    changed: int  # rows whose cursor is at or past the read floor


def period_text(value: Any) -> str | None:
    """One text per period value, the same for BigQuery's and psycopg's Python values of it."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return (value.astimezone(UTC) if value.tzinfo else value).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def source_slices(
    res: Resources, source_ref: str, *, snapshot: str | None, key: list[str], window: str | None,
    cursor_floor: Restriction | None = None, where: Restriction | None = None, partition_filter: str = "",
) -> list[SourceSlice]:
    """One aggregate query at the read snapshot: per period (or for the whole table) the rows, the distinct
    non-NULL keys and the rows at or past the cursor floor.

    Args:
        key, window: source column names.
        cursor_floor: the changed rows (their values bound as query parameters).
        where: the rows counted (a repair's keys; parameters too).
        partition_filter: the table's partition predicate (from its metadata, tasks/partitions.py).
    """
    from google.cloud import bigquery

    project, dataset, table = source_ref.split(".")
    at = ""
    if snapshot and res.source.time_travel:  # the emulator has no time travel
        at = f" FOR SYSTEM_TIME AS OF TIMESTAMP '{datetime.fromisoformat(snapshot).isoformat()}'"
    changed, changed_params = query_where(cursor_floor, "c") if cursor_floor is not None else (None, [])
    scope, scope_params = query_where(where, "w") if where is not None else ("", [])
    scope = " AND ".join(f"({p})" for p in (scope, partition_filter) if p)
    query = digest.bq_period_counts_query(f"{bq_ident(project)}.{bq_ident(dataset)}.{bq_ident(table)}{at}", key=key,
                                          window=window, changed=changed, where=scope or None)
    from tasks.sources import query_rows

    _, rows = query_rows(res.source, query, table=source_ref, what="the reconciliation's count query",
                         job_config=bigquery.QueryJobConfig(query_parameters=changed_params + scope_params))
    return [SourceSlice(period_text(r[0]), int(r[1]), int(r[2]), int(r[3] or 0)) for r in rows]


@dataclass(frozen=True)
class PeriodChoice:
    """Which periods a window-mode run reads whole, and which vanished from the source."""

    read: list[str | None]  # periods read whole (and replaced)
    vanished: list[str | None]  # periods in the target that the source no longer has (deleted whole)
    expected: dict[str | None, int]  # period -> rows the target must hold after the publish

    def only(self, periods: list[str | None]) -> PeriodChoice:
        """The same choice restricted to ``periods`` (each still read whole, or deleted whole if vanished)."""
        keep = set(periods)
        return PeriodChoice(read=[p for p in self.read if p in keep], vanished=[p for p in self.vanished if p in keep],
                            expected={p: n for p, n in self.expected.items() if p in keep})


def choose_periods(source: list[SourceSlice], target: dict[str | None, int], *, everything: bool) -> PeriodChoice:
    """Decide the periods to replace: every period that holds a changed row, or whose row count differs
    from the target's (a delete or a late row changes no cursor), or that vanished from the source.
    ``everything``: a full read (first load, full refresh, no cursor) replaces every period.

    A period is only ever replaced when it is read whole, so no run deletes what it did not read.
    """
    by_period = {s.period: s for s in source}
    read = [p for p, s in by_period.items() if everything or s.changed > 0 or target.get(p, 0) != s.keys]
    vanished = [p for p, n in target.items() if p not in by_period and n > 0]
    expected = {p: by_period[p].keys for p in read} | {p: 0 for p in vanished}
    return PeriodChoice(read=_sorted(read), vanished=_sorted(vanished), expected=expected)


def _sorted(periods: list[str | None]) -> list[str | None]:
    return sorted(periods, key=lambda p: (p is None, p or ""))


def target_period_counts(conn: psycopg.Connection[Any], schema: str, table: str, window: str,
                         live_only: str | None) -> dict[str | None, int]:
    """Rows per period in the target (soft-deleted rows left out)."""
    rows = conn.execute(digest.pg_period_counts_query(ident(schema, table), window=window,
                                                      live_only=live_only)).fetchall()
    return {period_text(r[0]): int(r[1]) for r in rows}


def window_restriction(periods: list[str | None], column: str, bq_type: str) -> Restriction:
    """The rows of exactly these periods, whole (values from period_text)."""
    values = tuple(p for p in periods if p is not None)
    parts: list[Restriction] = [Cond(column, "IN", bq_type, values)] if values else []
    if None in periods:
        parts.append(Cond(column, "IS NULL", bq_type))
    return any_of(parts) if parts else NO_ROW


def period_scope(alias: str, column: str, pg_type: str, periods: list[str | None]) -> sql.Composed:
    """SQL: the target rows of these periods (values bound as literals of the column's type)."""
    values = [p for p in periods if p is not None]
    parts: list[sql.Composable] = []
    if values:
        parts.append(sql.SQL("{}.{} = ANY({}::{}[])").format(sql.Identifier(alias), ident(column),
                                                            sql.Literal(values), sql.SQL(pg_type)))
    if None in periods:
        parts.append(sql.SQL("{}.{} IS NULL").format(sql.Identifier(alias), ident(column)))
    return sql.SQL("({})").format(sql.SQL(" OR ").join(parts) if parts else sql.SQL("false"))


def prove(conn: Any, *, table: str, target: sql.Composable, window: str | None, pg_type: str | None,
          expected_periods: dict[str | None, int] | None, expected_rows: int | None,
          live_only: str | None, scope: sql.Composable | None = None) -> list[str]:
    """Inside the publish transaction: the target's rows per replaced period (or in all, or in ``scope``: a
    repair's keys) against the source's count at the read snapshot. Returns the differences, each naming the slice
    and both figures."""
    problems: list[str] = []
    if expected_periods is not None and window and pg_type:
        periods = list(expected_periods)
        rows = conn.execute(digest.pg_period_counts_query(target, window=window, live_only=live_only,
                                                          scope=period_scope("t", window, pg_type, periods))).fetchall()
        have = {period_text(r[0]): int(r[1]) for r in rows}
        for period, want in expected_periods.items():
            if have.get(period, 0) != want:
                problems.append(f"{window} = {period}: target {have.get(period, 0)} rows, source {want}")
    if expected_rows is not None:
        row = conn.execute(digest.pg_period_counts_query(target, window=None, scope=scope,
                                                         live_only=live_only)).fetchone()
        have_rows = int(row[1]) if row else -1
        if have_rows != expected_rows:
            problems.append(f"{'the repaired keys' if scope is not None else 'whole table'}: target {have_rows} rows,"
                            f" source {expected_rows}")
    return problems


def refuse_vanished(table: str, vanished: list[str | None], limit: int, allow_deletes: bool, window: str) -> None:
    """More vanished periods than ``limit`` in one run needs an explicit --allow-deletes.

    Raises:
        QualityCheckFailed: naming the periods.
    """
    if len(vanished) > limit and not allow_deletes:
        shown = ", ".join(str(p) for p in vanished[:10]) + (" ..." if len(vanished) > 10 else "")
        raise QualityCheckFailed(
            f"{len(vanished)} periods of {window} vanished from the source ({shown}); deleting more than"
            f" max_vanished_periods={limit} in one run needs --allow-deletes; nothing published",
            table=table, vanished=[str(p) for p in vanished])
