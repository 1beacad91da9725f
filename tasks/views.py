"""Views downstream of refreshed tables: found in the catalog, materialized ones refreshed in order, all probed."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql

from tasks.sqlnames import ident, quote_ident

DEPENDENTS_SQL = """
WITH RECURSIVE deps(oid, depth) AS (
    SELECT DISTINCT r.ev_class, 1
      FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
     WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
       AND d.refobjid = ANY(%s::regclass[]) AND r.ev_class <> d.refobjid
    UNION
    SELECT r.ev_class, deps.depth + 1
      FROM deps JOIN pg_depend d ON d.refobjid = deps.oid AND d.classid = 'pg_rewrite'::regclass
      JOIN pg_rewrite r ON r.oid = d.objid
     WHERE r.ev_class <> deps.oid AND deps.depth < 50
)
SELECT n.nspname, c.relname, c.relkind, max(deps.depth) AS depth
  FROM deps JOIN pg_class c ON c.oid = deps.oid JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('v', 'm')
 GROUP BY n.nspname, c.relname, c.relkind
 ORDER BY depth, n.nspname, c.relname
"""


@dataclass
class ViewResult:
    """What happened to one dependent view."""

    view: str
    kind: str  # view | materialized view
    refreshed: bool
    concurrently: bool
    duration_ms: int
    queryable: bool
    error: str | None = None


def dependents(conn: psycopg.Connection[Any], tables: list[str]) -> list[tuple[str, str, str, int]]:
    """Views and materialized views depending on ``tables`` ("schema.table"), transitively, in
    dependency order (every view after the views it reads)."""
    regs = [".".join(quote_ident(p) for p in t.split(".", 1)) for t in tables]
    existing = [r for r in regs if (row := conn.execute("SELECT to_regclass(%s)", (r,)).fetchone()) and row[0]]
    if not existing:
        return []
    rows = conn.execute(DEPENDENTS_SQL, (existing,)).fetchall()
    return [(r[0], r[1], "materialized view" if r[2] == "m" else "view", int(r[3])) for r in rows]


def _can_refresh_concurrently(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    row = conn.execute(
        "SELECT c.relispopulated AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique"
        " AND i.indpred IS NULL AND i.indexprs IS NULL) FROM pg_class c WHERE c.oid = to_regclass(%s)",
        (f"{quote_ident(schema)}.{quote_ident(name)}",),
    ).fetchone()
    return bool(row and row[0])


def refresh_dependents(
    conn: psycopg.Connection[Any], registry_schema: str, changed: list[str], probe: list[str] | None = None,
) -> list[ViewResult]:
    """Refresh the materialized views downstream of ``changed`` tables in order (CONCURRENTLY where a
    unique index allows it), then query every view downstream of ``changed`` and ``probe`` tables.

    Never drops anything. ``conn`` must be in autocommit mode (CONCURRENTLY refuses transactions).
    """
    results: dict[str, ViewResult] = {}
    # A materialized view whose last refresh failed is refreshed again even when its tables did not change:
    # otherwise it would stay at its old contents, queryable, and look fine.
    changed_views = {(s, n) for s, n, _k, _d in dependents(conn, changed)}
    retry = _last_refresh_failed(conn, registry_schema)
    for schema, name, kind, _depth in dependents(conn, sorted(set(changed) | set(probe or []))):
        if kind != "materialized view" or ((schema, name) not in changed_views and (schema, name) not in retry):
            continue
        label = f"{schema}.{name}"
        concurrently = _can_refresh_concurrently(conn, schema, name)
        started = time.monotonic()
        error = None
        try:
            conn.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}{}").format(
                sql.SQL("CONCURRENTLY ") if concurrently else sql.SQL(""), ident(schema, name)))
        except psycopg.Error as exc:
            error = f"{type(exc).__name__}: {exc.diag.message_primary or exc}"
        ms = int((time.monotonic() - started) * 1000)
        results[label] = ViewResult(label, kind, error is None, concurrently, ms, error is None, error)
        conn.execute(
            sql.SQL("INSERT INTO {} (view_schema, view_name, refresh_started_at, refresh_completed_at, duration_ms,"
                    " refreshed_concurrently, status, error_message) VALUES (%s, %s, now() - make_interval(secs => %s),"
                    " now(), %s, %s, %s, %s)").format(ident(registry_schema, "materialized_view_refresh_status")),
            (schema, name, ms / 1000, ms, concurrently, "failed" if error else "success", error),
        )
    for schema, name, kind, _depth in dependents(conn, sorted(set(changed) | set(probe or []))):
        label = f"{schema}.{name}"
        try:
            conn.execute(sql.SQL("SELECT 1 FROM {} LIMIT 1").format(ident(schema, name))).fetchall()
            queryable, error = True, None
        except psycopg.Error as exc:
            queryable, error = False, f"{type(exc).__name__}: {exc.diag.message_primary or exc}"
        if label in results:
            results[label].queryable = queryable and results[label].queryable
            results[label].error = results[label].error or error
        else:
            results[label] = ViewResult(label, kind, False, False, 0, queryable, error)
    return list(results.values())


def _last_refresh_failed(conn: psycopg.Connection[Any], registry_schema: str) -> set[tuple[str, str]]:
    """Materialized views whose latest recorded refresh failed."""
    rows = conn.execute(sql.SQL(
        "SELECT DISTINCT ON (view_schema, view_name) view_schema, view_name, status FROM {}"
        " ORDER BY view_schema, view_name, id DESC").format(ident(registry_schema, "materialized_view_refresh_status"))
    ).fetchall()
    return {(str(r[0]), str(r[1])) for r in rows if r[2] == "failed"}


def failed(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The views of a refresh that failed: a materialized view whose refresh failed, or any view that did not
    answer its probe."""
    return [v for v in results if v.get("error") or not v.get("queryable", True)]


def view_tables(conn: psycopg.Connection[Any], views: list[str], tables: list[str]) -> dict[str, list[str]]:
    """For each of ``views`` ("schema.name"), the ``tables`` it reads, directly or through other views."""
    out: dict[str, list[str]] = {v: [] for v in views}
    for table in sorted(set(tables)):
        for schema, name, _kind, _depth in dependents(conn, [table]):
            label = f"{schema}.{name}"
            if label in out:
                out[label].append(table)
    return out


def as_dicts(results: list[ViewResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
