"""What operators read: per-table status and health, history, metrics, quality results, checkpoints."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from tasks import checkpoints as run_state
from tasks.freshness import is_stale
from tasks.sqlnames import ident


@dataclass
class TableStatus:
    table: str
    enabled: bool
    priority: int
    frequency_hours: int
    last_status: str | None
    last_run_at: datetime | None
    last_error: str | None
    last_success_at: datetime | None
    next_refresh_at: datetime | None
    watermark: str | None
    healthy: bool
    reason: str | None
    views_failed: list[dict[str, Any]] | None = None  # dependent views that failed after the last run's publish
    data_as_of: datetime | None = None  # the read snapshot of the last successful publish
    age_hours: float | None = None  # of data_as_of (or the last success, or the registration)
    stale: bool = False  # older than its frequency plus the grace

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def table_status(conn: psycopg.Connection[Any], schema: str, *, grace_hours: float = 2.0) -> list[TableStatus]:
    """One row per registered table, with health: enabled tables must have succeeded within their
    frequency plus ``grace_hours``, and their latest run must not have failed."""
    query = sql.SQL(
        """
        SELECT c.table_schema || '.' || c.table_name AS name, c.is_enabled, c.priority, c.refresh_frequency_hours,
               c.next_refresh_at, c.watermark, now() AS now,
               last.status AS last_status, last.refresh_started_at AS last_run_at, last.error_message,
               ok.completed AS last_success_at, ran.views_failed, f.data_as_of, f.age_hours
          FROM {cfg} c
          LEFT JOIN LATERAL (SELECT status, refresh_started_at, error_message FROM {audit} a
                              WHERE a.table_schema = c.table_schema AND a.table_name = c.table_name
                                AND a.status <> 'running' ORDER BY a.id DESC LIMIT 1) last ON true
          LEFT JOIN LATERAL (SELECT max(refresh_completed_at) AS completed FROM {audit} a
                              WHERE a.table_schema = c.table_schema AND a.table_name = c.table_name
                                AND a.status IN ('success', 'warning')
                                AND NOT coalesce((a.sync_metadata->>'dry_run')::boolean, false)) ok ON true
          LEFT JOIN LATERAL (SELECT a.sync_metadata->'views_failed' AS views_failed FROM {audit} a
                              WHERE a.table_schema = c.table_schema AND a.table_name = c.table_name
                                AND a.status IN ('success', 'warning', 'failed')
                                AND NOT coalesce((a.sync_metadata->>'dry_run')::boolean, false)
                              ORDER BY a.id DESC LIMIT 1) ran ON true
          LEFT JOIN {freshness} f ON f.table_schema = c.table_schema AND f.table_name = c.table_name
         ORDER BY c.priority DESC, name
        """
    ).format(cfg=ident(schema, "refresh_config"), audit=ident(schema, "refresh_audit_log"),
             freshness=ident(schema, "refresh_freshness"))
    out = []
    with conn.cursor(row_factory=dict_row) as cur:
        for r in cur.execute(query).fetchall():
            healthy, reason = True, None
            age = None if r["age_hours"] is None else float(r["age_hours"])
            stale = age is not None and is_stale(bool(r["is_enabled"]), age, r["refresh_frequency_hours"] or 24,
                                                 grace_hours)
            if r["is_enabled"]:
                limit = timedelta(hours=(r["refresh_frequency_hours"] or 24) + grace_hours)
                if r["last_status"] == "failed":
                    healthy, reason = False, f"last run failed: {(r['error_message'] or '')[:200]}"
                elif r["last_success_at"] is None:
                    healthy, reason = False, "never refreshed successfully"
                elif r["now"] - r["last_success_at"] > limit:
                    since = r["now"] - r["last_success_at"]
                    healthy, reason = False, f"stale: last success {since.total_seconds() / 3600:.1f} h ago (limit {limit.total_seconds() / 3600:.0f} h)"
                elif stale and r["data_as_of"] is not None:
                    healthy, reason = False, (f"stale: data as of {r['data_as_of'].isoformat()}, {age:.1f} h old"
                                              f" (limit {limit.total_seconds() / 3600:g} h)")
                if healthy and r["views_failed"]:
                    healthy, reason = False, "dependent view(s) failed after the last refresh: " + "; ".join(
                        f"{v['view']}: {v.get('error') or 'not queryable'}" for v in r["views_failed"])[:300]
            out.append(TableStatus(
                table=r["name"], enabled=r["is_enabled"], priority=r["priority"], frequency_hours=r["refresh_frequency_hours"],
                last_status=r["last_status"], last_run_at=r["last_run_at"], last_error=r["error_message"],
                last_success_at=r["last_success_at"], next_refresh_at=r["next_refresh_at"], watermark=r["watermark"],
                healthy=healthy, reason=reason, views_failed=r["views_failed"] or None,
                data_as_of=r["data_as_of"], age_hours=age, stale=stale,
            ))
    return out


HISTORY_COLUMNS = ("id", "table_schema", "table_name", "status", "refresh_started_at", "refresh_completed_at",
                   "rows_processed", "rows_inserted", "rows_updated", "rows_deleted", "execution_time_ms",
                   "memory_used_mb", "bigquery_job_id", "error_message", "sync_metadata")


def history(
    conn: psycopg.Connection[Any], schema: str, *, table: str | None = None, status: str | None = None,
    since: datetime | None = None, until: datetime | None = None, limit: int = 50, offset: int = 0,
) -> list[dict[str, Any]]:
    """Audit rows, newest first, filtered by table ("schema.table" or name), status and time."""
    where: list[sql.Composable] = []
    params: list[Any] = []
    if table:
        if "." in table:
            s, t = table.split(".", 1)
            where.append(sql.SQL("table_schema = %s AND table_name = %s"))
            params += [s, t]
        else:
            where.append(sql.SQL("table_name = %s"))
            params.append(table)
    if status:
        where.append(sql.SQL("status = %s"))
        params.append(status)
    if since:
        where.append(sql.SQL("refresh_started_at >= %s"))
        params.append(since)
    if until:
        where.append(sql.SQL("refresh_started_at < %s"))
        params.append(until)
    query = sql.SQL("SELECT {} FROM {} {} ORDER BY id DESC LIMIT %s OFFSET %s").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in HISTORY_COLUMNS), ident(schema, "refresh_audit_log"),
        sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
    )
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query, [*params, limit, offset]).fetchall())


def metrics(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    """Per table over 30 days: runs, success rate, rows, durations, seconds since the last success (dry runs, which
    publish nothing, apart)."""
    query = sql.SQL(
        """
        SELECT c.table_schema || '.' || c.table_name AS table,
               count(a.id) FILTER (WHERE a.status IN ('success', 'warning', 'failed')) AS runs,
               count(a.id) FILTER (WHERE a.status IN ('success', 'warning')) AS successes,
               count(a.id) FILTER (WHERE a.status = 'failed') AS failures,
               coalesce(sum(a.rows_processed), 0)::bigint AS rows_read, coalesce(sum(a.rows_inserted), 0)::bigint AS rows_inserted,
               coalesce(sum(a.rows_updated), 0)::bigint AS rows_updated, coalesce(sum(a.rows_deleted), 0)::bigint AS rows_deleted,
               avg(a.execution_time_ms) FILTER (WHERE a.status IN ('success', 'warning')) AS avg_duration_ms,
               max(a.execution_time_ms) AS max_duration_ms,
               extract(epoch FROM now() - max(a.refresh_completed_at) FILTER (WHERE a.status IN ('success', 'warning')))
                   AS seconds_since_last_success
          FROM {cfg} c
          LEFT JOIN {audit} a ON a.table_schema = c.table_schema AND a.table_name = c.table_name
                             AND a.refresh_started_at > now() - interval '30 days'
                             AND NOT coalesce((a.sync_metadata->>'dry_run')::boolean, false)
         GROUP BY 1 ORDER BY 1
        """
    ).format(cfg=ident(schema, "refresh_config"), audit=ident(schema, "refresh_audit_log"))
    with conn.cursor(row_factory=dict_row) as cur:
        rows = list(cur.execute(query).fetchall())
    for r in rows:
        r["success_rate"] = (r["successes"] / r["runs"]) if r["runs"] else None
        for k in ("avg_duration_ms", "seconds_since_last_success"):
            r[k] = None if r[k] is None else float(r[k])
    return rows


def quality(conn: psycopg.Connection[Any], schema: str, *, table: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    params: list[Any] = []
    where = sql.SQL("")
    if table:
        where = sql.SQL("WHERE a.table_name = %s OR a.table_schema || '.' || a.table_name = %s")
        params += [table, table]
    query = sql.SQL(
        "SELECT q.id, a.table_schema || '.' || a.table_name AS table, q.metric_name, q.metric_value, q.expected_value,"
        " q.threshold_min, q.threshold_max, q.is_within_threshold, q.created_at FROM {} q JOIN {} a ON a.id = q.audit_log_id"
        " {} ORDER BY q.id DESC LIMIT %s"
    ).format(ident(schema, "refresh_data_quality"), ident(schema, "refresh_audit_log"), where)
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query, [*params, limit]).fetchall())


def checks_passed(conn: psycopg.Connection[Any], schema: str, audit_ids: list[int]) -> dict[int, tuple[int, int]]:
    """audit id -> (checks passed, checks run)."""
    rows = conn.execute(sql.SQL(
        "SELECT audit_log_id, count(*) FILTER (WHERE is_within_threshold), count(*) FROM {}"
        " WHERE audit_log_id = ANY(%s) GROUP BY audit_log_id").format(ident(schema, "refresh_data_quality")),
        (audit_ids,)).fetchall()
    return {int(r[0]): (int(r[1]), int(r[2])) for r in rows}


def checkpoints(conn: psycopg.Connection[Any], schema: str, *, status: str | None = "active") -> list[dict[str, Any]]:
    """The latest checkpoints (of ``status``, or all), newest first."""
    return run_state.listing(conn, schema, status=status)


def rollback(conn: psycopg.Connection[Any], schema: str) -> dict[str, int]:
    """The spec's emergency procedure: disable every table and expire every active checkpoint."""
    with conn.transaction():
        disabled = conn.execute(sql.SQL("UPDATE {} SET is_enabled = false WHERE is_enabled").format(
            ident(schema, "refresh_config"))).rowcount
        expired = run_state.expire_every_active(conn, schema)
    return {"tables_disabled": disabled, "checkpoints_expired": expired}


def run_phase(checkpoint_status: str | None, streams: list[str], done: dict[str, bool], checks_recorded: int) -> str:
    """Where a running table is, from what it has written so far: planning (no checkpoint yet), reading (streams
    still open), checking (every stream read, the quality gate not recorded yet), publishing (the gate recorded,
    the checkpoint not yet closed by the publish), finishing (published: views and records)."""
    if checkpoint_status is None:
        return "planning"
    if checkpoint_status == "completed":
        return "finishing"
    if checks_recorded:
        return "publishing"
    if streams and all(done.get(s) for s in streams):
        return "checking"
    return "reading"


def in_progress(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    """Table runs in progress (audit rows still running), oldest first: phase, rows staged so far, rows skipped
    as unchanged, rows expected (the read session's estimate; None until it is known), and how long it has run."""
    query = sql.SQL(
        """
        SELECT a.id AS audit_id, a.table_schema || '.' || a.table_name AS table, a.refresh_started_at AS started_at,
               extract(epoch FROM clock_timestamp() - a.refresh_started_at)::float8 AS seconds,
               a.sync_metadata->>'flow_run_id' AS flow_run_id, c.status AS checkpoint_status,
               c.last_processed_row AS rows_staged, c.checkpoint_data->'session' AS session,
               c.checkpoint_data->'done' AS done, (c.checkpoint_data->>'unchanged')::bigint AS rows_unchanged,
               (SELECT count(*) FROM {quality} q WHERE q.audit_log_id = a.id) AS checks_recorded
          FROM {audit} a
          LEFT JOIN {ckpt} c ON true
         WHERE a.status = 'running'
         ORDER BY a.id
        """
    ).format(audit=ident(schema, "refresh_audit_log"), ckpt=run_state.of_running_audits(schema),
             quality=ident(schema, "refresh_data_quality"))
    out = []
    with conn.cursor(row_factory=dict_row) as cur:
        for r in cur.execute(query).fetchall():
            session = r.pop("session") or {}
            done = {str(k): bool(v) for k, v in (r.pop("done") or {}).items()}
            streams = [str(s) for s in session.get("streams") or []]
            expected = int(session.get("estimated_rows") or 0)
            r["phase"] = run_phase(r.pop("checkpoint_status"), streams, done, int(r.pop("checks_recorded")))
            r["rows_staged"] = None if r["rows_staged"] is None else int(r["rows_staged"])
            r["rows_expected"] = expected or None
            out.append(r)
    return out
