"""Runs started through the HTTP API (refresh_runs): the refresh system's own run id, and what became of it."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from bq_refresh.redact import redact
from tasks.sqlnames import ident

ACTIVE = ("queued", "running")
FINAL = ("success", "failed", "interrupted", "cancelled")
COLUMNS = ("id", "status", "mode", "parameters", "tables", "requested_at", "started_at", "finished_at",
           "heartbeat_at", "flow_run_id", "deployment", "served_by", "outcomes", "error")


def _table(schema: str) -> sql.Composable:
    return ident(schema, "refresh_runs")


def create_run(conn: psycopg.Connection[Any], schema: str, *, mode: str, parameters: dict[str, Any],
               tables: list[str], served_by: str | None = None, deployment: str | None = None) -> str:
    """Record a run that was asked for (status queued); return its id."""
    run_id = str(uuid.uuid4())
    conn.execute(sql.SQL("INSERT INTO {} (id, mode, parameters, tables, served_by, deployment, heartbeat_at)"
                         " VALUES (%s, %s, %s, %s, %s, %s, now())").format(_table(schema)),
                 (run_id, mode, Jsonb(parameters), tables, served_by, deployment))
    return run_id


def mark_running(conn: psycopg.Connection[Any], schema: str, run_id: str, *, flow_run_id: str | None = None) -> None:
    """The run started (its Prefect flow run, when known)."""
    conn.execute(sql.SQL("UPDATE {} SET status = 'running', started_at = coalesce(started_at, now()),"
                         " heartbeat_at = now(), flow_run_id = coalesce(%s, flow_run_id)"
                         " WHERE id = %s AND status IN ('queued', 'running')").format(_table(schema)),
                 (flow_run_id, run_id))


def attach_flow_run(conn: psycopg.Connection[Any], schema: str, run_id: str, flow_run_id: str) -> None:
    """The Prefect flow run that carries the run (a deployment's, before a worker picks it up)."""
    conn.execute(sql.SQL("UPDATE {} SET flow_run_id = %s WHERE id = %s").format(_table(schema)), (flow_run_id, run_id))


def finish_run(conn: psycopg.Connection[Any], schema: str, run_id: str, *, status: str,
               outcomes: list[dict[str, Any]] | None = None, error: str | None = None,
               flow_run_id: str | None = None) -> None:
    """Close a run with its outcome per table (a run already closed, e.g. interrupted, stays as it is)."""
    assert status in FINAL, status
    conn.execute(sql.SQL("UPDATE {} SET status = %s, finished_at = now(), started_at = coalesce(started_at, now()),"
                         " outcomes = %s, error = %s, flow_run_id = coalesce(%s, flow_run_id)"
                         " WHERE id = %s AND status IN ('queued', 'running')").format(_table(schema)),
                 (status, None if outcomes is None else Jsonb(outcomes),
                  None if error is None else redact(error)[:4000], flow_run_id, run_id))


def beat(conn: psycopg.Connection[Any], schema: str, run_ids: list[str]) -> None:
    """The process running these local runs is alive."""
    if run_ids:
        conn.execute(sql.SQL("UPDATE {} SET heartbeat_at = now() WHERE id = ANY(%s::uuid[])"
                             " AND status IN ('queued', 'running')").format(_table(schema)), (run_ids,))


def interrupt(conn: psycopg.Connection[Any], schema: str, run_ids: list[str], reason: str) -> int:
    """Close runs that will not finish (their process is stopping); return how many."""
    if not run_ids:
        return 0
    return conn.execute(sql.SQL("UPDATE {} SET status = 'interrupted', finished_at = now(), error = %s"
                                " WHERE id = ANY(%s::uuid[]) AND status IN ('queued', 'running')").format(
        _table(schema)), (reason, run_ids)).rowcount


def interrupt_silent(conn: psycopg.Connection[Any], schema: str, *, silent_s: float) -> int:
    """Close local runs whose process stopped beating more than ``silent_s`` ago (killed without a chance to say
    so); their tables' next runs resume from the checkpoints. Returns how many."""
    return conn.execute(sql.SQL(
        "UPDATE {} SET status = 'interrupted', finished_at = now(),"
        " error = 'the bq-refresh serve process running it stopped (killed or lost) before the run finished;"
        " the next run of its tables resumes from their checkpoints'"
        " WHERE mode = 'local' AND status IN ('queued', 'running')"
        " AND heartbeat_at < now() - make_interval(secs => %s)").format(_table(schema)), (silent_s,)).rowcount


def get_run(conn: psycopg.Connection[Any], schema: str, run_id: str) -> dict[str, Any] | None:
    """One run, or None when there is none of that id."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(sql.SQL("SELECT {} FROM {} WHERE id = %s").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS), _table(schema)), (run_id,)).fetchone()
    return None if row is None else _plain(row)


def active_runs(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    """Runs queued or running, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(sql.SQL("SELECT {} FROM {} WHERE status IN ('queued', 'running') ORDER BY requested_at").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS), _table(schema))).fetchall()
    return [_plain(r) for r in rows]


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    row["id"] = str(row["id"])
    row["tables"] = list(row["tables"] or [])
    return row
