"""Housekeeping: expire checkpoints, retention of the logs, the audit archive, orphaned staging, discovery."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from blocks.bigquery import BigQuerySource
from bq_refresh.errors import TargetError
from tasks import checkpoints
from tasks.extract import short_retry
from tasks.load import ROWHASH_SUFFIX, rowhash_table, run_of
from tasks.registry import list_entries
from tasks.sqlnames import ident, idents

# Live table -> its archive (migration 005). The quality and quarantine rows of an archived audit row go with it:
# their foreign keys to the audit log cascade on delete, so archiving the audit row alone would lose them.
AUDIT_ARCHIVES = {
    "refresh_audit_log": "refresh_audit_log_archive",
    "refresh_data_quality": "refresh_data_quality_archive",
    "refresh_quarantine": "refresh_quarantine_archive",
}


@dataclass
class MaintenanceReport:
    checkpoints_expired: int = 0
    checkpoints_deleted: int = 0
    alerts_deleted: int = 0
    view_refreshes_deleted: int = 0
    audit_rows_archived: int = 0
    quality_rows_archived: int = 0
    quarantine_rows_archived: int = 0
    staging_tables_dropped: list[str] = field(default_factory=list)
    rowhash_tables_dropped: list[str] = field(default_factory=list)
    verified: dict[str, str] = field(default_factory=dict)  # table -> equal, differs, not_verified
    repaired: list[str] = field(default_factory=list)
    tables_discovered: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ArchiveCounts:
    """Rows moved to the archive by one ``archive_audit`` call."""

    audit: int
    quality: int
    quarantine: int


def expire_checkpoints(conn: psycopg.Connection[Any], schema: str, *, all_active: bool = False) -> int:
    """Expire checkpoints past their expiry (or every active one: the rollback procedure)."""
    if all_active:
        return checkpoints.expire_every_active(conn, schema)
    row = conn.execute(sql.SQL("SELECT {}()").format(ident(schema, "expire_checkpoints"))).fetchone()
    return int(row[0]) if row else 0


def delete_finished_checkpoints(conn: psycopg.Connection[Any], schema: str, retention_days: int) -> int:
    """Delete completed and expired checkpoints last changed more than ``retention_days`` ago.

    An active checkpoint is never deleted, however old: it is a run that can still be resumed (expiry, above,
    is what ends it). An expired one's staging table is dropped by ``drop_orphaned_staging``.
    """
    return checkpoints.delete_finished(conn, schema, retention_days)


def delete_old_alerts(conn: psycopg.Connection[Any], schema: str, retention_days: int) -> int:
    """Delete alert-log rows (``refresh_alerts``, delivered or not) older than ``retention_days``."""
    cur = conn.execute(
        sql.SQL("DELETE FROM {} WHERE created_at < now() - make_interval(days => %s)").format(
            ident(schema, "refresh_alerts")),
        (retention_days,),
    )
    return cur.rowcount


def delete_old_view_refreshes(conn: psycopg.Connection[Any], schema: str, retention_days: int) -> int:
    """Delete view-refresh log rows older than ``retention_days``, except each view's latest row (its last
    outcome stays known however long ago it was) and rows still 'running'."""
    table = ident(schema, "materialized_view_refresh_status")
    cur = conn.execute(
        sql.SQL("DELETE FROM {} m WHERE m.refresh_started_at < now() - make_interval(days => %s)"
                " AND m.status IS DISTINCT FROM 'running'"
                " AND EXISTS (SELECT 1 FROM {} newer WHERE newer.view_schema = m.view_schema"
                " AND newer.view_name = m.view_name AND newer.id > m.id)").format(table, table),
        (retention_days,),
    )
    return cur.rowcount


def _columns(conn: psycopg.Connection[Any], schema: str, table: str) -> list[tuple[str, str]]:
    """(name, SQL type) of a table's columns, in order."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (schema, table),
    ).fetchall()
    return [(str(r[0]), str(r[1])) for r in rows]


def _ensure_archive_columns(conn: psycopg.Connection[Any], schema: str) -> dict[str, list[str]]:
    """Give each archive every column its live table has (a later migration may add one to the live table
    only) and return the live tables' column names: rows are copied column by column, never dropped."""
    live_columns: dict[str, list[str]] = {}
    for live, archive in AUDIT_ARCHIVES.items():
        columns = _columns(conn, schema, live)
        present = {name for name, _ in _columns(conn, schema, archive)}
        for name, sql_type in columns:
            if name not in present:
                conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                    ident(schema, archive), ident(name), sql.SQL(sql_type)))
        live_columns[live] = [name for name, _ in columns]
    return live_columns


def audit_referencing_tables(conn: psycopg.Connection[Any], schema: str) -> set[str]:
    """Tables of ``schema`` with a foreign key to the audit log."""
    rows = conn.execute(
        "SELECT DISTINCT c.relname FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE k.contype = 'f' AND n.nspname = %s"
        " AND k.confrelid = (SELECT r.oid FROM pg_class r JOIN pg_namespace rn ON rn.oid = r.relnamespace"
        "                    WHERE rn.nspname = %s AND r.relname = 'refresh_audit_log')",
        (schema, schema),
    ).fetchall()
    return {str(r[0]) for r in rows}


def archive_audit(conn: psycopg.Connection[Any], schema: str, retention_days: int) -> ArchiveCounts:
    """Move finished audit rows started more than ``retention_days`` ago, with their quality and quarantine
    rows, into the archive tables: in one statement of one transaction, so each row is either still live or
    archived, never lost and never in both. Rows keep their ids. A 'running' row is never moved.

    Raises:
        TargetError: another table references the audit log (a newer migration): moving would cascade to (or be
            refused by) rows the archive does not know; nothing is moved.
    """
    with conn.transaction():
        unknown = audit_referencing_tables(conn, schema) - set(AUDIT_ARCHIVES)
        if unknown:
            raise TargetError(f"cannot archive audit rows: {', '.join(sorted(unknown))} reference(s) the audit log"
                              " and has no archive (tasks/maintenance.py AUDIT_ARCHIVES)", schema=schema)
        cols = _ensure_archive_columns(conn, schema)
        audit, quality, quarantine = "refresh_audit_log", "refresh_data_quality", "refresh_quarantine"
        row = conn.execute(
            sql.SQL(
                "WITH doomed AS (SELECT id FROM {audit} WHERE refresh_started_at < now() - make_interval(days => %s)"
                "   AND status IS DISTINCT FROM 'running' FOR UPDATE),"
                " q AS (DELETE FROM {quality} WHERE audit_log_id IN (SELECT id FROM doomed) RETURNING {qcols}),"
                " qa AS (INSERT INTO {quality_archive} ({qcols}) SELECT {qcols} FROM q RETURNING 1),"
                " z AS (DELETE FROM {quarantine} WHERE audit_log_id IN (SELECT id FROM doomed) RETURNING {zcols}),"
                " za AS (INSERT INTO {quarantine_archive} ({zcols}) SELECT {zcols} FROM z RETURNING 1),"
                " a AS (DELETE FROM {audit} WHERE id IN (SELECT id FROM doomed) RETURNING {acols}),"
                " aa AS (INSERT INTO {audit_archive} ({acols}) SELECT {acols} FROM a RETURNING 1)"
                " SELECT (SELECT count(*) FROM aa), (SELECT count(*) FROM qa), (SELECT count(*) FROM za)"
            ).format(
                audit=ident(schema, audit), audit_archive=ident(schema, AUDIT_ARCHIVES[audit]), acols=idents(cols[audit]),
                quality=ident(schema, quality), quality_archive=ident(schema, AUDIT_ARCHIVES[quality]),
                qcols=idents(cols[quality]), quarantine=ident(schema, quarantine),
                quarantine_archive=ident(schema, AUDIT_ARCHIVES[quarantine]), zcols=idents(cols[quarantine]),
            ),
            (retention_days,),
        ).fetchone()
    assert row is not None
    return ArchiveCounts(audit=int(row[0]), quality=int(row[1]), quarantine=int(row[2]))


def drop_orphaned_staging(conn: psycopg.Connection[Any], schema: str, staging_schema: str) -> list[str]:
    """Drop staging tables no active checkpoint refers to (left by expired or abandoned runs)."""
    active = checkpoints.active_staging_tables(conn, schema)
    tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (staging_schema,))]
    dropped = []
    for t in tables:
        if t.endswith(ROWHASH_SUFFIX):  # a live table's row hashes, not a run's
            continue
        if run_of(t) not in active:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident(staging_schema, t)))
            dropped.append(t)
    return dropped


_MARKER = re.compile(r"^bq-refresh row hashes of .* \(oid (\d+), key ")


def drop_orphaned_rowhashes(conn: psycopg.Connection[Any], schema: str, staging_schema: str,
                            shadow_schema: str) -> list[str]:
    """Drop the row-hash side tables (load.ensure_rowhash) that no longer stand for a live table: their table was
    dropped (or dropped and made again: another OID) or renamed, or no registry entry targets it any more (live or
    shadow). A table with our suffix but without our marker is not ours and is left. A side table in use by a run
    is not waited for (lock_timeout): the next maintenance drops it."""
    wanted = set()
    for entry in list_entries(conn, schema):
        try:
            spec = entry.spec()
        except Exception:  # noqa: BLE001 -- a registry row with invalid parameters still names its table
            spec = None
        target_schema, target_table = (spec.target.split(".", 1) if spec is not None and spec.target
                                       else (entry.table_schema, entry.table_name))
        wanted |= {rowhash_table(target_schema, target_table), rowhash_table(shadow_schema, target_table)}
    rows = conn.execute(
        "SELECT c.relname, obj_description(c.oid, 'pg_class') FROM pg_class c JOIN pg_namespace n ON n.oid ="
        " c.relnamespace WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND c.relname LIKE %s",
        (staging_schema, "%" + ROWHASH_SUFFIX)).fetchall()
    dropped = []
    for name, marker in rows:
        m = _MARKER.match(marker or "")
        if m is None:
            continue
        live = conn.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                            " WHERE c.oid = %s::oid", (m.group(1),)).fetchone()
        if live is not None and rowhash_table(str(live[0]), str(live[1])) == name and name in wanted:
            continue
        with conn.transaction():
            conn.execute("SET LOCAL lock_timeout = '2s'")
            try:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident(staging_schema, name)))
            except psycopg.errors.LockNotAvailable:
                continue
        dropped.append(str(name))
    return dropped


def discover_tables(conn: psycopg.Connection[Any], schema: str, source: BigQuerySource) -> list[str]:
    """Register BigQuery tables of the source dataset that the registry does not know, disabled.

    They need key and cursor settings before they can be enabled; the registry row holds the source.
    """
    client = source.get_bigquery_client()
    rows = conn.execute(sql.SQL("SELECT table_name, custom_sync_params->>'source' FROM {}").format(
        ident(schema, "refresh_config"))).fetchall()
    known = {str(r[0]) for r in rows} | {str(r[1]).split(".")[-1] for r in rows if r[1]}
    found = []
    for item in client.list_tables(source.dataset, retry=short_retry(source.timeout_s)):
        name = item.table_id
        if name.startswith("_bqr_") or name in known:
            continue
        conn.execute(
            sql.SQL("INSERT INTO {} (table_schema, table_name, is_enabled, custom_sync_params, next_refresh_at)"
                    " VALUES (%s, %s, false, %s, now()) ON CONFLICT DO NOTHING").format(ident(schema, "refresh_config")),
            (schema, name, Jsonb({"source": f"{source.dataset}.{name}"})),
        )
        found.append(name)
    return found
