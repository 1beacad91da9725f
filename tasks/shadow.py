"""Shadow mode: compare a table published into the shadow schema with the live one, by key."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from tasks.load import target_columns
from tasks.sqlnames import ident


def compare(conn: psycopg.Connection[Any], live: tuple[str, str], shadow: tuple[str, str], key: list[str],
            *, sample: int = 10) -> dict[str, Any]:
    """Rows only in live, only in shadow, and with the same key but different values (common columns)."""
    live_cols, shadow_cols = target_columns(conn, *live), target_columns(conn, *shadow)
    if not shadow_cols:
        return {"error": f"no shadow table {shadow[0]}.{shadow[1]}: run the table in shadow mode first"}
    common = [c for c in live_cols if c in shadow_cols and c not in key]
    on = sql.SQL(" AND ").join(sql.SQL("l.{} = s.{}").format(ident(k), ident(k)) for k in key)
    differs = sql.SQL("({}) IS DISTINCT FROM ({})").format(
        sql.SQL(", ").join(sql.SQL("l.{}").format(ident(c)) for c in common) if common else sql.SQL("1"),
        sql.SQL(", ").join(sql.SQL("s.{}").format(ident(c)) for c in common) if common else sql.SQL("1"))
    k0 = ident(key[0])
    row = conn.execute(sql.SQL(
        "SELECT count(*) FILTER (WHERE s.{k0} IS NULL), count(*) FILTER (WHERE l.{k0} IS NULL),"
        " count(*) FILTER (WHERE l.{k0} IS NOT NULL AND s.{k0} IS NOT NULL AND {differs}),"
        " count(*) FILTER (WHERE l.{k0} IS NOT NULL AND s.{k0} IS NOT NULL AND NOT {differs})"
        " FROM {live} l FULL OUTER JOIN {shadow} s ON {on}"
    ).format(k0=k0, differs=differs, live=ident(*live), shadow=ident(*shadow), on=on)).fetchone()
    assert row is not None
    keys = sql.SQL(", ").join(sql.SQL("coalesce(l.{}, s.{})").format(ident(k), ident(k)) for k in key)
    examples = conn.execute(sql.SQL(
        "SELECT {keys}, CASE WHEN s.{k0} IS NULL THEN 'only in live' WHEN l.{k0} IS NULL THEN 'only in shadow'"
        " ELSE 'different' END FROM {live} l FULL OUTER JOIN {shadow} s ON {on}"
        " WHERE s.{k0} IS NULL OR l.{k0} IS NULL OR {differs} LIMIT %s"
    ).format(keys=keys, k0=k0, live=ident(*live), shadow=ident(*shadow), on=on, differs=differs), (sample,)).fetchall()
    return {
        "live": ".".join(live), "shadow": ".".join(shadow), "only_in_live": row[0], "only_in_shadow": row[1],
        "different": row[2], "same": row[3], "compared_columns": common,
        "examples": [{"key": list(e[:-1]), "difference": e[-1]} for e in examples],
        "identical": row[0] == row[1] == row[2] == 0,
    }
