"""The registry: refresh_config rows and their dependencies, read and written."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from bq_refresh.errors import ConfigError, DependencyCycle
from tasks.planning import split_cycles
from tasks.selection import valid_tags
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
    tags: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.table_schema}.{self.table_name}"

    def spec(self) -> TableSpec:
        return TableSpec.parse_for(self.name, self.params)

    @property
    def publish_group(self) -> str | None:
        """The publish group the table belongs to (None when its parameters are invalid: its run says so)."""
        try:
            return self.spec().publish_group
        except ConfigError:
            return None


def complete_groups(selected: list[RegistryEntry], every: list[RegistryEntry]) -> tuple[list[RegistryEntry], dict[str, str]]:
    """The tables a run refreshes, with every enabled member of each publish group one of them belongs to
    (a group publishes together, so it refreshes together).

    Returns:
        The completed list (registry order) and the tables added, each with its group.
    """
    groups = {e.publish_group for e in selected} - {None}
    chosen = {e.name for e in selected}
    added = {e.name: str(e.publish_group) for e in every
             if e.name not in chosen and e.is_enabled and e.publish_group in groups}
    return [e for e in every if e.name in chosen or e.name in added], added


def _row_to_entry(row: dict[str, Any]) -> RegistryEntry:
    return RegistryEntry(
        id=row["id"], table_schema=row["table_schema"], table_name=row["table_name"],
        is_enabled=bool(row["is_enabled"]), refresh_frequency_hours=row["refresh_frequency_hours"] or 24,
        priority=row["priority"] if row["priority"] is not None else 100,
        last_refresh_at=row["last_refresh_at"], next_refresh_at=row["next_refresh_at"],
        watermark=row["watermark"], source_schema=row["source_schema"], params=row["custom_sync_params"] or {},
        watermark_target=row.get("watermark_target"), tags=sorted(row.get("tags") or []),
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
    tags: list[str] | None = None,
) -> RegistryEntry:
    """Validate ``params`` and insert or update the table's registry row.

    A disabled table without parameters is a placeholder (as auto-registration and discovery leave a table not yet
    mapped to a source): it is registered as it is; its parameters are validated when they are given.

    Args:
        tags: the table's tags (``run --select tag:NAME``); None keeps a registered table's tags.
    """
    table_schema, table_name = split_qualified(name, schema)
    tags = valid_tags(tags, f"{table_schema}.{table_name}") if tags is not None else None
    placeholder = not enabled and not params
    spec = None if placeholder else TableSpec.parse_for(f"{table_schema}.{table_name}", params)
    # A target whose row-level security would hide rows from the refresh: refused now.
    if spec is not None and not spec.shadow:
        from tasks.load import rls_refusal

        target_schema, target_table = spec.target.split(".", 1) if spec.target else (table_schema, table_name)
        refusal = rls_refusal(conn, target_schema, target_table)
        if refusal:
            raise ConfigError(f"not registered: {refusal}", table=f"{table_schema}.{table_name}")
    conn.execute(
        sql.SQL(
            "INSERT INTO {t} (table_schema, table_name, is_enabled, refresh_frequency_hours, priority,"
            " custom_sync_params, tags, next_refresh_at) VALUES (%s, %s, %s, %s, %s, %s, coalesce(%s::text[], '{{}}'), now())"
            " ON CONFLICT (table_schema, table_name) DO UPDATE SET is_enabled = EXCLUDED.is_enabled,"
            " refresh_frequency_hours = EXCLUDED.refresh_frequency_hours, priority = EXCLUDED.priority,"
            " custom_sync_params = EXCLUDED.custom_sync_params, tags = coalesce(%s::text[], {t}.tags)"
        ).format(t=ident(schema, "refresh_config")),
        (table_schema, table_name, enabled, frequency_hours, priority, Jsonb(params), tags, tags),
    )
    if not conn.autocommit:
        conn.commit()
    return get_entry(conn, schema, f"{table_schema}.{table_name}")


def add_dependency(
    conn: psycopg.Connection[Any], schema: str, parent: str, dependent: str, kind: str = "hard"
) -> None:
    """Record that ``dependent`` refreshes after ``parent``.

    Raises:
        ConfigError: a table is not registered, or the kind is neither hard nor soft.
        DependencyCycle: the dependency would put ``dependent`` on a cycle, or behind one, that it is not on
            today (a night would fail it); nothing is recorded.
    """
    if kind not in {"hard", "soft"}:
        raise ConfigError(f"dependency type must be hard or soft, not {kind!r}", table=dependent)
    p = get_entry(conn, schema, parent)
    d = get_entry(conn, schema, dependent)
    tables = {e.name: e.priority for e in list_entries(conn, schema)}
    edges = [(x.parent, x.dependent, x.kind) for x in list_dependencies(conn, schema)]
    before = split_cycles(tables, edges)[1]
    after = split_cycles(tables, [*edges, (p.name, d.name, kind)])[1]
    if d.name in after and d.name not in before:
        raise DependencyCycle(f"refused: depending on {p.name} makes a {after[d.name]}; nothing changed",
                              table=d.name)
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (parent_config_id, dependent_config_id, dependency_type) VALUES (%s, %s, %s)"
            " ON CONFLICT (parent_config_id, dependent_config_id) DO UPDATE SET dependency_type = EXCLUDED.dependency_type"
        ).format(ident(schema, "refresh_dependencies")),
        (p.id, d.id, kind),
    )
    if not conn.autocommit:
        conn.commit()


def remove_dependency(conn: psycopg.Connection[Any], schema: str, parent: str, dependent: str) -> None:
    """Forget that ``dependent`` refreshes after ``parent`` (hard or soft).

    Raises:
        ConfigError: a table is not registered, or ``dependent`` does not depend on ``parent``.
    """
    p = get_entry(conn, schema, parent)
    d = get_entry(conn, schema, dependent)
    gone = conn.execute(
        sql.SQL("DELETE FROM {} WHERE parent_config_id = %s AND dependent_config_id = %s").format(
            ident(schema, "refresh_dependencies")),
        (p.id, d.id),
    ).rowcount
    if not gone:
        raise ConfigError(f"does not depend on {p.name} (bq-refresh tables show {d.name} lists its dependencies)",
                          table=d.name)
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


def last_slot(at: datetime, frequency_hours: int, anchor: time) -> datetime:
    """The schedule slot a refresh at ``at`` belongs to: the latest point at or before ``at`` of the grid
    that starts each day at ``anchor`` (UTC) and steps by the frequency (by whole days from 24 hours up).

    A run of the 02:00 schedule that publishes at 02:01:35 or at 04:10 belongs to the 02:00 slot; so does
    a manual run at 14:00 (for a daily table).
    """
    at = at.astimezone(UTC)
    day_anchor = datetime.combine(at.date(), anchor, tzinfo=UTC)
    if day_anchor > at:
        day_anchor -= timedelta(days=1)
    if frequency_hours >= 24:
        return day_anchor
    step = timedelta(hours=frequency_hours)
    return day_anchor + step * ((at - day_anchor) // step)


def next_due(at: datetime, frequency_hours: int, anchor: time) -> datetime:
    """When a table refreshed at ``at`` is due again: its slot plus its frequency. A daily table is due at
    the next night's anchor whatever the previous run's duration or start; a weekly one on the same weekday."""
    return last_slot(at, frequency_hours, anchor) + timedelta(hours=frequency_hours)


def is_due(entry: RegistryEntry, now: datetime, tolerance: timedelta) -> bool:
    """Due when its next slot has come (a run that starts up to ``tolerance`` early counts)."""
    return entry.next_refresh_at is None or entry.next_refresh_at <= now + tolerance


def due_entries(
    conn: psycopg.Connection[Any], schema: str, *, names: list[str] | None = None, force: bool = False,
    now: datetime | None = None, tolerance: timedelta = timedelta(minutes=15),
) -> list[RegistryEntry]:
    """The tables a run should refresh: the named ones, else the enabled ones that are due (or all, forced).

    Args:
        now: the run's reference time (default: the database's clock).
        tolerance: a run that starts this much before a table's slot still refreshes it.
    """
    entries = list_entries(conn, schema)
    if names:
        wanted = {".".join(split_qualified(n, schema)) for n in names}
        unknown = wanted - {e.name for e in entries}
        if unknown:
            raise ConfigError(f"not registered: {', '.join(sorted(unknown))} (bq-refresh tables list shows the"
                              " registered tables)")
        return [e for e in entries if e.name in wanted]
    if now is None:
        row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        now = row[0]
    assert now is not None
    return [e for e in entries if e.is_enabled and (force or is_due(e, now, tolerance))]


def mark_refreshed(conn: psycopg.Connection[Any], schema: str, config_id: int, at: datetime, anchor: time) -> None:
    """Record a publish at ``at`` (in the caller's transaction): last refresh, and the next slot it is due."""
    row = conn.execute(sql.SQL("SELECT refresh_frequency_hours FROM {} WHERE id = %s").format(
        ident(schema, "refresh_config")), (config_id,)).fetchone()
    frequency = int(row[0] or 24) if row else 24
    conn.execute(sql.SQL("UPDATE {} SET last_refresh_at = %s, next_refresh_at = %s WHERE id = %s").format(
        ident(schema, "refresh_config")), (at, next_due(at, frequency, anchor), config_id))


def update_table(
    conn: psycopg.Connection[Any], schema: str, name: str, *, enabled: bool | None = None,
    priority: int | None = None, frequency_hours: int | None = None, params: dict[str, Any] | None = None,
    merge_params: bool = True, tags: list[str] | None = None,
) -> RegistryEntry:
    """Change a registered table; new sync parameters are validated before anything is written.

    Args:
        tags: the table's tags from now on (None: unchanged).

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
    if tags is not None:
        sets.append(sql.SQL("tags = %s"))
        values.append(valid_tags(tags, entry.name))
    if sets:
        conn.execute(sql.SQL("UPDATE {} SET {} WHERE id = %s").format(ident(schema, "refresh_config"),
                                                                     sql.SQL(", ").join(sets)), [*values, entry.id])
        if not conn.autocommit:
            conn.commit()
    return get_entry(conn, schema, entry.name)


def enable_all(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    """Enable every disabled table (after ``bq-refresh rollback``); returns the tables it enabled."""
    rows = conn.execute(
        sql.SQL("UPDATE {} SET is_enabled = true WHERE NOT is_enabled"
                " RETURNING table_schema || '.' || table_name").format(ident(schema, "refresh_config"))
    ).fetchall()
    if not conn.autocommit:
        conn.commit()
    return sorted(str(r[0]) for r in rows)


def remove_table(conn: psycopg.Connection[Any], schema: str, name: str) -> None:
    """Unregister a table (its audit rows stay; the live table is not touched)."""
    entry = get_entry(conn, schema, name)
    conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(ident(schema, "refresh_config")), (entry.id,))
    if not conn.autocommit:
        conn.commit()
