"""Housekeeping: expire checkpoints, purge old audit rows, drop orphaned staging, discover new tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from blocks.bigquery import BigQuerySource
from tasks.extract import short_retry
from tasks.load import run_of
from tasks.sqlnames import ident


@dataclass
class MaintenanceReport:
    checkpoints_expired: int = 0
    audit_rows_purged: int = 0
    staging_tables_dropped: list[str] = field(default_factory=list)
    tables_discovered: list[str] = field(default_factory=list)


def expire_checkpoints(conn: psycopg.Connection[Any], schema: str, *, all_active: bool = False) -> int:
    """Expire checkpoints past their expiry (or every active one: the rollback procedure)."""
    if all_active:
        cur = conn.execute(sql.SQL("UPDATE {} SET status = 'expired' WHERE status = 'active'").format(
            ident(schema, "refresh_checkpoints")))
        return cur.rowcount
    row = conn.execute(sql.SQL("SELECT {}()").format(ident(schema, "expire_checkpoints"))).fetchone()
    return int(row[0]) if row else 0


def purge_audit(conn: psycopg.Connection[Any], schema: str, retention_days: int) -> int:
    row = conn.execute(sql.SQL("SELECT {}(%s)").format(ident(schema, "purge_audit_log")), (retention_days,)).fetchone()
    return int(row[0]) if row else 0


def drop_orphaned_staging(conn: psycopg.Connection[Any], schema: str, staging_schema: str) -> list[str]:
    """Drop staging tables no active checkpoint refers to (left by expired or abandoned runs)."""
    active = {
        str(r[0]) for r in conn.execute(
            sql.SQL("SELECT checkpoint_data->'plan'->>'staging_table' FROM {} WHERE status = 'active'").format(
                ident(schema, "refresh_checkpoints"))).fetchall() if r[0]
    }
    tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (staging_schema,))]
    dropped = []
    for t in tables:
        if run_of(t) not in active:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident(staging_schema, t)))
            dropped.append(t)
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
