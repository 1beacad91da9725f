"""The registry: refresh_config rows and their dependencies, read and written."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from bq_refresh.errors import ConfigError
from tasks.spec import TableSpec
from tasks.sqlnames import ident, split_qualified


@dataclass
class RegistryEntry:
    """One refresh_config row, with its parsed spec."""

    id: int
    table_schema: str
    table_name: str
    is_enabled: bool
    refresh_frequency_hours: int
    priority: int
    last_refresh_at: datetime | None
    next_refresh_at: datetime | None
    watermark: str | None
    source_schema: list[dict[str, str]] | None
    params: dict[str, Any]
    watermark_target: str | None = None

    @property
    def name(self) -> str:
        return f"{self.table_schema}.{self.table_name}"

    def spec(self) -> TableSpec:
        return TableSpec.parse_for(self.name, self.params)


def _row_to_entry(row: dict[str, Any]) -> RegistryEntry:
    return RegistryEntry(
        id=row["id"], table_schema=row["table_schema"], table_name=row["table_name"],
        is_enabled=bool(row["is_enabled"]), refresh_frequency_hours=row["refresh_frequency_hours"] or 24,
        priority=row["priority"] if row["priority"] is not None else 100,
        last_refresh_at=row["last_refresh_at"], next_refresh_at=row["next_refresh_at"],
        watermark=row["watermark"], source_schema=row["source_schema"], params=row["custom_sync_params"] or {},
        watermark_target=row.get("watermark_target"),
    )


def get_entry(conn: psycopg.Connection[Any], schema: str, name: str) -> RegistryEntry:
    """Find a registered table by "schema.table" or bare table name.

    Raises:
        ConfigError: the table is not registered.
    """
    table_schema, table_name = split_qualified(name, schema)
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL("SELECT * FROM {} WHERE table_schema = %s AND table_name = %s").format(
                ident(schema, "refresh_config")
            ),
            (table_schema, table_name),
        )
        row = cur.fetchone()
    if row is None:
        raise ConfigError("not registered (bq-refresh tables add ...)", table=f"{table_schema}.{table_name}")
    return _row_to_entry(row)


def list_entries(conn: psycopg.Connection[Any], schema: str) -> list[RegistryEntry]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            sql.SQL("SELECT * FROM {} ORDER BY priority DESC, table_schema, table_name").format(
                ident(schema, "refresh_config")
            )
        )
        return [_row_to_entry(r) for r in cur.fetchall()]


def register_table(
    conn: psycopg.Connection[Any],
    schema: str,
    name: str,
    params: dict[str, Any],
    *,
    priority: int = 100,
    frequency_hours: int = 24,
    enabled: bool = True,
) -> RegistryEntry:
    """Validate ``params`` and insert or update the table's registry row."""
    table_schema, table_name = split_qualified(name, schema)
    TableSpec.parse_for(f"{table_schema}.{table_name}", params)
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (table_schema, table_name, is_enabled, refresh_frequency_hours, priority,"
            " custom_sync_params, next_refresh_at) VALUES (%s, %s, %s, %s, %s, %s, now())"
            " ON CONFLICT (table_schema, table_name) DO UPDATE SET is_enabled = EXCLUDED.is_enabled,"
            " refresh_frequency_hours = EXCLUDED.refresh_frequency_hours, priority = EXCLUDED.priority,"
            " custom_sync_params = EXCLUDED.custom_sync_params"
        ).format(ident(schema, "refresh_config")),
        (table_schema, table_name, enabled, frequency_hours, priority, Jsonb(params)),
    )
    if not conn.autocommit:
        conn.commit()
    return get_entry(conn, schema, f"{table_schema}.{table_name}")


def add_dependency(
    conn: psycopg.Connection[Any], schema: str, parent: str, dependent: str, kind: str = "hard"
) -> None:
    """Record that ``dependent`` refreshes after ``parent``."""
    if kind not in {"hard", "soft"}:
        raise ConfigError(f"dependency type must be hard or soft, not {kind!r}", table=dependent)
    p = get_entry(conn, schema, parent)
    d = get_entry(conn, schema, dependent)
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (parent_config_id, dependent_config_id, dependency_type) VALUES (%s, %s, %s)"
            " ON CONFLICT (parent_config_id, dependent_config_id) DO UPDATE SET dependency_type = EXCLUDED.dependency_type"
        ).format(ident(schema, "refresh_dependencies")),
        (p.id, d.id, kind),
    )
    if not conn.autocommit:
        conn.commit()


@dataclass(frozen=True)
class Dependency:
    parent: str
    dependent: str
    kind: str  # hard | soft


def list_dependencies(conn: psycopg.Connection[Any], schema: str) -> list[Dependency]:
    rows = conn.execute(
        sql.SQL(
            "SELECT p.table_schema || '.' || p.table_name, d.table_schema || '.' || d.table_name, x.dependency_type"
            " FROM {} x JOIN {} p ON p.id = x.parent_config_id JOIN {} d ON d.id = x.dependent_config_id"
        ).format(ident(schema, "refresh_dependencies"), ident(schema, "refresh_config"), ident(schema, "refresh_config"))
    ).fetchall()
    return [Dependency(r[0], r[1], r[2] or "hard") for r in rows]


def due_entries(
    conn: psycopg.Connection[Any], schema: str, *, names: list[str] | None = None, force: bool = False
) -> list[RegistryEntry]:
    """The tables a run should refresh: the named ones, else the enabled ones that are due (or all, forced)."""
    entries = list_entries(conn, schema)
    if names:
        wanted = {".".join(split_qualified(n, schema)) for n in names}
        unknown = wanted - {e.name for e in entries}
        if unknown:
            raise ConfigError(f"not registered: {', '.join(sorted(unknown))}")
        return [e for e in entries if e.name in wanted]
    now = conn.execute("SELECT now()").fetchone()
    assert now is not None
    return [e for e in entries if e.is_enabled and (force or e.next_refresh_at is None or e.next_refresh_at <= now[0])]


def update_table(
    conn: psycopg.Connection[Any], schema: str, name: str, *, enabled: bool | None = None,
    priority: int | None = None, frequency_hours: int | None = None, params: dict[str, Any] | None = None,
    merge_params: bool = True,
) -> RegistryEntry:
    """Change a registered table; new sync parameters are validated before anything is written.

    Raises:
        ConfigError: the table is not registered, or the parameters are invalid (naming the key).
    """
    entry = get_entry(conn, schema, name)
    sets: list[sql.Composable] = []
    values: list[Any] = []
    if params is not None:
        merged = {**entry.params, **params} if merge_params else params
        TableSpec.parse_for(entry.name, merged)
        sets.append(sql.SQL("custom_sync_params = %s"))
        values.append(Jsonb(merged))
    for column, value in (("is_enabled", enabled), ("priority", priority), ("refresh_frequency_hours", frequency_hours)):
        if value is not None:
            if column == "refresh_frequency_hours" and int(value) <= 0:
                raise ConfigError("refresh_frequency_hours must be positive", table=entry.name)
            sets.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            values.append(value)
    if sets:
        conn.execute(sql.SQL("UPDATE {} SET {} WHERE id = %s").format(ident(schema, "refresh_config"),
                                                                     sql.SQL(", ").join(sets)), [*values, entry.id])
        if not conn.autocommit:
            conn.commit()
    return get_entry(conn, schema, entry.name)


def remove_table(conn: psycopg.Connection[Any], schema: str, name: str) -> None:
    """Unregister a table (its audit rows stay; the live table is not touched)."""
    entry = get_entry(conn, schema, name)
    conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(ident(schema, "refresh_config")), (entry.id,))
    if not conn.autocommit:
        conn.commit()
