"""The audit log: one row per table run, opened as running and closed with real figures."""

from __future__ import annotations

import resource
import traceback
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from bq_refresh.errors import RefreshError
from bq_refresh.redact import redact
from tasks.sqlnames import ident


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def start_audit(
    conn: psycopg.Connection[Any], schema: str, *, config_id: int | None, table_schema: str, table_name: str,
    metadata: dict[str, Any] | None = None,
) -> int:
    """Open an audit row with status running; return its id (committed at once)."""
    row = conn.execute(
        sql.SQL(
            "INSERT INTO {} (refresh_config_id, table_schema, table_name, refresh_started_at, status, sync_metadata)"
            " VALUES (%s, %s, %s, clock_timestamp(), 'running', %s) RETURNING id"
        ).format(ident(schema, "refresh_audit_log")),
        (config_id, table_schema, table_name, Jsonb(metadata or {})),
    ).fetchone()
    if not conn.autocommit:
        conn.commit()
    assert row is not None
    return int(row[0])


def error_details(exc: BaseException) -> dict[str, Any]:
    details: dict[str, Any] = {
        "type": type(exc).__name__,
        "traceback": redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:]),
    }
    if isinstance(exc, RefreshError):
        details["table"] = exc.table
        details["transient"] = exc.transient
        details["context"] = {k: redact(v) if isinstance(v, str) else v for k, v in exc.context.items()}
    return details


def finish_audit(
    conn: psycopg.Connection[Any], schema: str, audit_id: int, *, status: str,
    rows_processed: int | None = None, rows_inserted: int | None = None, rows_updated: int | None = None,
    rows_deleted: int | None = None, bigquery_job_id: str | None = None,
    metadata: dict[str, Any] | None = None, error: BaseException | None = None,
) -> None:
    """Close an audit row with the run's figures (execution time measured by the database clock)."""
    conn.execute(
        sql.SQL(
            "UPDATE {} SET status = %s, refresh_completed_at = clock_timestamp(),"
            " execution_time_ms = (extract(epoch FROM clock_timestamp() - refresh_started_at) * 1000)::int,"
            " rows_processed = %s, rows_inserted = %s, rows_updated = %s, rows_deleted = %s,"
            " memory_used_mb = %s, bigquery_job_id = coalesce(%s, bigquery_job_id),"
            " sync_metadata = sync_metadata || %s, error_message = %s, error_details = %s WHERE id = %s"
        ).format(ident(schema, "refresh_audit_log")),
        (
            status, rows_processed, rows_inserted, rows_updated, rows_deleted, round(peak_rss_mb(), 2),
            bigquery_job_id, Jsonb(metadata or {}), None if error is None else redact(str(error))[:4000],
            None if error is None else Jsonb(error_details(error)), audit_id,
        ),
    )
    if not conn.autocommit:
        conn.commit()


def last_status(conn: psycopg.Connection[Any], schema: str, table_schema: str, table_name: str) -> str | None:
    """The status of the table's latest finished run (for 'recovered after a failure' alerts)."""
    row = conn.execute(
        sql.SQL("SELECT status FROM {} WHERE table_schema = %s AND table_name = %s AND status <> 'running'"
                " ORDER BY id DESC LIMIT 1").format(ident(schema, "refresh_audit_log")),
        (table_schema, table_name),
    ).fetchone()
    return None if row is None else str(row[0])


def close_running_audit(conn: psycopg.Connection[Any], schema: str, flow_run_id: str, message: str) -> int:
    """Mark audit rows a crashed/cancelled flow run left 'running' as failed; return how many."""
    cur = conn.execute(
        sql.SQL("UPDATE {} SET status = 'failed', refresh_completed_at = clock_timestamp(),"
                " execution_time_ms = (extract(epoch FROM clock_timestamp() - refresh_started_at) * 1000)::int,"
                " error_message = %s WHERE status = 'running' AND sync_metadata->>'flow_run_id' = %s").format(
            ident(schema, "refresh_audit_log")),
        (redact(message)[:4000], flow_run_id),
    )
    if not conn.autocommit:
        conn.commit()
    return cur.rowcount


def close_interrupted_audits(conn: psycopg.Connection[Any], schema: str, table_schema: str, table_name: str,
                             by_audit_id: int) -> int:
    """Close the table's audit rows an earlier run left 'running' (killed with SIGKILL, or its database
    connection lost before it could write its outcome). Called while holding the table's lock, so no
    other run of the table is alive. Returns how many were closed."""
    cur = conn.execute(
        sql.SQL("UPDATE {} SET status = 'failed', refresh_completed_at = clock_timestamp(),"
                " execution_time_ms = (extract(epoch FROM clock_timestamp() - refresh_started_at) * 1000)::int,"
                " error_message = %s WHERE status = 'running' AND table_schema = %s AND table_name = %s"
                " AND id < %s").format(ident(schema, "refresh_audit_log")),
        (f"interrupted: the run ended without recording its outcome (process killed or database connection lost);"
         f" run {by_audit_id} took over and resumed its checkpoint", table_schema, table_name, by_audit_id),
    )
    if not conn.autocommit:
        conn.commit()
    return cur.rowcount


def audit_id_of_flow_run(conn: psycopg.Connection[Any], schema: str, flow_run_id: str) -> int | None:
    """The audit row a flow run opened (its latest), for the alerts its failure hooks send; None if it opened none."""
    row = conn.execute(
        sql.SQL("SELECT max(id) FROM {} WHERE sync_metadata->>'flow_run_id' = %s").format(
            ident(schema, "refresh_audit_log")),
        (flow_run_id,),
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def mark_views_failed(conn: psycopg.Connection[Any], schema: str, audit_id: int, status: str,
                      views_failed: list[dict[str, Any]]) -> str:
    """Record on a finished table run the dependent views that failed after its publish, and raise its status
    to ``status`` ('warning' or 'failed'; a failed run stays failed, a warning is never lowered). The data was
    published: the row keeps its figures. Returns the row's status now."""
    summary = "; ".join(f"{v['view']}: {v.get('error') or 'not queryable'}" for v in views_failed)
    row = conn.execute(
        sql.SQL("UPDATE {} SET status = CASE WHEN status = 'failed' OR %s = 'failed' THEN 'failed' ELSE 'warning' END,"
                " sync_metadata = sync_metadata || jsonb_build_object('views_failed', %s::jsonb),"
                " error_message = CASE WHEN %s = 'failed' THEN coalesce(error_message, %s) ELSE error_message END"
                " WHERE id = %s RETURNING status").format(ident(schema, "refresh_audit_log")),
        (status, Jsonb(views_failed), status, redact(f"dependent view(s) failed: {summary}")[:4000], audit_id),
    ).fetchone()
    if not conn.autocommit:
        conn.commit()
    return status if row is None else str(row[0])
