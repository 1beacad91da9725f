"""A run's checkpoint (the registry's refresh_checkpoints): the one module that reads or writes it.

A checkpoint is the state of one table's run: its plan and read session, each stream's committed offset, the
staged rows' counts and checksum, and, once published, what was published. Every function takes the caller's
connection and never opens its own: a batch and its checkpoint, and a publish and its checkpoint, commit together
(tasks/load.py, tasks/publish.py). The statements on an ADBC connection bind ``$n`` parameters; the others are
psycopg statements (a psycopg connection, or ``fastpath.AdbcSession`` inside an ADBC transaction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tasks.sqlnames import ident, quote_ident

TABLE = "refresh_checkpoints"


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint row: ``rows`` is last_processed_row (rows staged so far)."""

    id: int
    status: str
    data: dict[str, Any]
    rows: int


def _table(schema: str) -> sql.Composable:
    return ident(schema, TABLE)


def _of(row: Any) -> Checkpoint | None:
    return None if row is None else Checkpoint(int(row[0]), str(row[1]), dict(row[2] or {}), int(row[3] or 0))


def create(conn: Any, schema: str, *, function_name: str, table_schema: str, table_name: str,
           data: dict[str, Any], ttl_hours: int) -> int:
    """Insert an active checkpoint for a new run.

    Returns:
        Its id.
    """
    row = conn.execute(
        sql.SQL("INSERT INTO {} (function_name, table_schema, table_name, checkpoint_data, last_processed_row,"
                " status, expires_at) VALUES (%s, %s, %s, %s, 0, 'active', now() + make_interval(hours => %s))"
                " RETURNING id").format(_table(schema)),
        (function_name, table_schema, table_name, Jsonb(data), ttl_hours)).fetchone()
    assert row is not None
    return int(row[0])


def read(conn: Any, schema: str, checkpoint_id: int, *, lock: bool = False) -> Checkpoint | None:
    """The checkpoint ``checkpoint_id`` (locked for the rest of the caller's transaction with ``lock``)."""
    return _of(conn.execute(
        sql.SQL("SELECT id, status, checkpoint_data, last_processed_row FROM {} WHERE id = %s{}").format(
            _table(schema), sql.SQL(" FOR UPDATE") if lock else sql.SQL("")), (checkpoint_id,)).fetchone())


def active(conn: Any, schema: str, function_name: str, table_schema: str, table_name: str, *,
           unexpired: bool = False) -> Checkpoint | None:
    """The table's active checkpoint (one at most), if any; with ``unexpired``, only one not past its expiry."""
    return _of(conn.execute(
        sql.SQL("SELECT id, status, checkpoint_data, last_processed_row FROM {} WHERE function_name = %s"
                " AND table_schema = %s AND table_name = %s AND status = 'active'{}").format(
            _table(schema), sql.SQL(" AND expires_at >= now()") if unexpired else sql.SQL("")),
        (function_name, table_schema, table_name)).fetchone())


def expire(conn: Any, schema: str, checkpoint_id: int) -> None:
    """End a run that will not be resumed (its staging is dropped by the caller, or by maintenance)."""
    conn.execute(sql.SQL("UPDATE {} SET status = 'expired' WHERE id = %s").format(_table(schema)), (checkpoint_id,))


def expire_overdue(conn: Any, schema: str) -> None:
    """Expire the active checkpoints past their expiry."""
    conn.execute(sql.SQL("UPDATE {} SET status = 'expired' WHERE status = 'active' AND expires_at < now()").format(
        _table(schema)))


def expire_every_active(conn: Any, schema: str) -> int:
    """Expire every active checkpoint (the rollback procedure).

    Returns:
        How many were active.
    """
    return int(conn.execute(sql.SQL("UPDATE {} SET status = 'expired' WHERE status = 'active'").format(
        _table(schema))).rowcount)


def delete_finished(conn: Any, schema: str, retention_days: int) -> int:
    """Delete completed and expired checkpoints last changed more than ``retention_days`` ago; never an active
    one, however old (it is a run that can still be resumed).

    Returns:
        How many were deleted.
    """
    return int(conn.execute(
        sql.SQL("DELETE FROM {} WHERE status IN ('completed', 'expired')"
                " AND coalesce(updated_at, created_at) < now() - make_interval(days => %s)").format(_table(schema)),
        (retention_days,)).rowcount)


def active_staging_tables(conn: Any, schema: str) -> set[str]:
    """The staging tables the active checkpoints' runs own."""
    return {str(r[0]) for r in conn.execute(
        sql.SQL("SELECT checkpoint_data->'plan'->>'staging_table' FROM {} WHERE status = 'active'").format(
            _table(schema))).fetchall() if r[0]}


def complete(conn: Any, schema: str, checkpoint_id: int, total_rows: int, outcome: dict[str, Any]) -> None:
    """Close a run's checkpoint with what it published (``outcome`` merged into its data), in the publish's
    transaction."""
    conn.execute(sql.SQL("UPDATE {} SET status = 'completed', total_rows = %s, checkpoint_data = checkpoint_data"
                         " || %s WHERE id = %s").format(_table(schema)), (total_rows, Jsonb(outcome), checkpoint_id))


def restart_reading(conn: Any, schema: str, checkpoint_id: int, state: dict[str, Any]) -> None:
    """A new read session for the run: ``state`` (session, offsets, counts) replaces the old one's, nothing staged."""
    conn.execute(sql.SQL("UPDATE {} SET checkpoint_data = checkpoint_data || %s, last_processed_row = 0"
                         " WHERE id = %s").format(_table(schema)), (Jsonb(state), checkpoint_id))


def record_batch(adbc_cursor: Any, schema: str, checkpoint_id: int, *, stream: str, offset_after: int,
                 stream_done: bool, rows: int, checksum: int, quarantined: int, unchanged: int, refetched: int) -> None:
    """Move a stream's offset past one staged batch and add its counts, on the ADBC cursor whose transaction
    COPied the batch (an expired checkpoint is left as it is)."""
    adbc_cursor.execute(
        f"UPDATE {quote_ident(schema)}.{TABLE} SET"  # noqa: S608 - a quoted identifier; values bound
        " checkpoint_data = jsonb_set(jsonb_set(checkpoint_data, ARRAY['offsets', $2::text], to_jsonb($3::bigint)),"
        "   ARRAY['done', $2::text], to_jsonb($4::boolean))"
        " || jsonb_build_object('checksum', ((coalesce((checkpoint_data->>'checksum')::numeric, 0) + $6::numeric)"
        "      % 18446744073709551616)::text,"
        "    'quarantined', coalesce((checkpoint_data->>'quarantined')::bigint, 0) + $7::bigint,"
        "    'unchanged', coalesce((checkpoint_data->>'unchanged')::bigint, 0) + $8::bigint,"
        "    'refetched', coalesce((checkpoint_data->>'refetched')::bigint, 0) + $9::bigint),"
        " last_processed_row = coalesce(last_processed_row, 0) + $5::bigint,"
        " expires_at = greatest(expires_at, now() + interval '1 hour')"
        " WHERE id = $1::int AND status = 'active'",
        parameters=(checkpoint_id, stream, offset_after, stream_done, rows, str(checksum), quarantined, unchanged,
                    refetched),
    )


def record_source_keys(adbc_cursor: Any, schema: str, checkpoint_id: int, keys: int) -> None:
    """The number of source keys the run staged (the count a publish proves its UNLOGGED key table still holds)."""
    adbc_cursor.execute(f"UPDATE {quote_ident(schema)}.{TABLE} SET checkpoint_data = checkpoint_data"  # noqa: S608
                        " || jsonb_build_object('source_keys', $1::bigint) WHERE id = $2::int",
                        parameters=(keys, checkpoint_id))


def listing(conn: Any, schema: str, *, status: str | None = "active") -> list[dict[str, Any]]:
    """The latest 200 checkpoints (of ``status``, or all), newest first, as the API and CLI show them."""
    query = sql.SQL(
        "SELECT id, table_schema || '.' || table_name AS table, status, last_processed_row AS rows_staged,"
        " total_rows, checkpoint_data->'plan'->>'staging_table' AS staging_table, created_at, updated_at, expires_at"
        " FROM {} {} ORDER BY id DESC LIMIT 200"
    ).format(_table(schema), sql.SQL("WHERE status = %s") if status else sql.SQL(""))
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query, [status] if status else []).fetchall())


def of_running_audits(schema: str) -> sql.Composed:
    """A LATERAL subquery for the audit rows ``a`` of running tables: the checkpoint of each (its active one, or
    the one it closed since it started), with status, last_processed_row and checkpoint_data."""
    return sql.SQL(
        "LATERAL (SELECT status, last_processed_row, checkpoint_data FROM {} k"
        " WHERE k.table_schema = a.table_schema AND k.table_name = a.table_name"
        " AND (k.status = 'active' OR k.updated_at >= a.refresh_started_at)"
        " ORDER BY (k.status = 'active') DESC, k.id DESC LIMIT 1)").format(_table(schema))
