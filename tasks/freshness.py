"""Freshness: each table's age against its frequency, and the stale episodes alerted once each."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from bq_refresh.settings import Settings
from tasks.alerts import Alert, send_alert
from tasks.sqlnames import ident


@dataclass
class Freshness:
    """One row of the refresh_freshness view, judged with the grace of the settings."""

    table: str
    enabled: bool
    frequency_hours: int
    data_as_of: datetime | None  # the read snapshot of the last successful publish
    last_success: datetime | None
    rows: int | None  # PostgreSQL's live-row estimate of the target
    age_hours: float
    is_stale: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_stale(enabled: bool, age_hours: float, frequency_hours: int, grace_hours: float) -> bool:
    """An enabled table is stale when its data is older than its frequency plus the grace."""
    return enabled and age_hours > frequency_hours + grace_hours


def read_freshness(conn: psycopg.Connection[Any], schema: str, *, grace_hours: float) -> list[Freshness]:
    """Every registered table's freshness (the refresh_freshness view, migration 006)."""
    query = sql.SQL("SELECT table_schema, table_name, is_enabled, frequency_hours, data_as_of, last_success, \"rows\","
                    " age_hours FROM {} ORDER BY table_schema, table_name").format(ident(schema, "refresh_freshness"))
    out = []
    with conn.cursor(row_factory=dict_row) as cur:
        for r in cur.execute(query).fetchall():
            age = float(r["age_hours"])
            out.append(Freshness(
                table=f"{r['table_schema']}.{r['table_name']}", enabled=bool(r["is_enabled"]),
                frequency_hours=int(r["frequency_hours"]), data_as_of=r["data_as_of"], last_success=r["last_success"],
                rows=None if r["rows"] is None else int(r["rows"]), age_hours=age,
                is_stale=is_stale(bool(r["is_enabled"]), age, int(r["frequency_hours"]), grace_hours),
            ))
    return out


def episode_changes(stale: dict[str, bool], open_episodes: set[str]) -> tuple[list[str], list[str]]:
    """Which tables start a stale episode (alert ``stale``) and which end one (alert ``recovered``).

    Args:
        stale: table -> stale now, for the tables watched (enabled ones).
        open_episodes: tables with an open stale episode.

    Returns:
        (opened, closed), sorted. A table still stale, or still fresh, changes nothing: one alert per episode.
        An open episode of a table no longer watched (disabled, removed) is closed without a recovery.
    """
    opened = sorted(t for t, s in stale.items() if s and t not in open_episodes)
    closed = sorted(t for t in open_episodes if t in stale and not stale[t])
    return opened, closed


@dataclass
class FreshnessReport:
    stale: list[str]  # every stale table now
    alerted: list[str]  # episodes opened by this check (alert sent)
    recovered: list[str]  # episodes closed by this check (alert sent)


def check_freshness(conn: psycopg.Connection[Any], settings: Settings, *, flow_run_id: str | None = None,
                    flow_run_url: str | None = None) -> FreshnessReport:
    """Judge every enabled table's freshness; alert ``stale`` once when an episode starts and ``recovered`` when
    it ends (episodes kept in refresh_episodes, so the next run does not alert again). ``conn`` in autocommit."""
    schema = settings.schema_name
    rows = read_freshness(conn, schema, grace_hours=settings.health_grace_hours)
    watched = {f.table: f for f in rows if f.enabled}
    episodes = ident(schema, "refresh_episodes")
    open_rows = conn.execute(sql.SQL("SELECT table_schema || '.' || table_name, opened_at FROM {} WHERE kind = 'stale'")
                             .format(episodes)).fetchall()
    open_since = {str(r[0]): r[1] for r in open_rows}
    opened, closed = episode_changes({t: f.is_stale for t, f in watched.items()}, set(open_since))
    alerted, recovered = [], []
    for table in sorted(set(open_since) - set(watched)):
        conn.execute(sql.SQL("DELETE FROM {} WHERE kind = 'stale' AND table_schema = %s AND table_name = %s")
                     .format(episodes), table.split(".", 1))
    for table in opened:
        f = watched[table]
        details = {"age_hours": round(f.age_hours, 2), "frequency_hours": f.frequency_hours,
                   "grace_hours": settings.health_grace_hours, "data_as_of": f.data_as_of,
                   "last_success": f.last_success}
        inserted = conn.execute(sql.SQL("INSERT INTO {} (table_schema, table_name, kind, details) VALUES (%s, %s,"
                                        " 'stale', %s) ON CONFLICT DO NOTHING RETURNING 1").format(episodes),
                                (*table.split(".", 1), Jsonb({k: str(v) if isinstance(v, datetime) else v
                                                              for k, v in details.items()}))).fetchone()
        if inserted is None:  # another run opened it at the same moment and alerted
            continue
        as_of = f.data_as_of or f.last_success
        message = (f"{table}: data as of {as_of.isoformat() if as_of else 'never refreshed'}, {f.age_hours:.1f} h old;"
                   f" frequency {f.frequency_hours} h + grace {settings.health_grace_hours:g} h")
        send_alert(settings, Alert("stale", "warning", table, message, flow_run_id, flow_run_url, {}, details), conn)
        alerted.append(table)
    for table in closed:
        f = watched[table]
        deleted = conn.execute(sql.SQL("DELETE FROM {} WHERE kind = 'stale' AND table_schema = %s AND table_name = %s"
                                       " RETURNING opened_at").format(episodes), table.split(".", 1)).fetchone()
        if deleted is None:
            continue
        send_alert(settings, Alert("recovered", "success", table, None, flow_run_id, flow_run_url, {},
                                   {"from": "stale", "stale_since": deleted[0], "data_as_of": f.data_as_of,
                                    "age_hours": round(f.age_hours, 2)}), conn)
        recovered.append(table)
    return FreshnessReport(sorted(t for t, f in watched.items() if f.is_stale), alerted, recovered)


def open_episode(conn: psycopg.Connection[Any], schema: str, table: str, kind: str, details: dict[str, Any]) -> bool:
    """Open an alert episode of ``table`` (``kind`` stale or source_stale); False if one is open already."""
    row = conn.execute(sql.SQL("INSERT INTO {} (table_schema, table_name, kind, details) VALUES (%s, %s, %s, %s)"
                               " ON CONFLICT DO NOTHING RETURNING 1").format(ident(schema, "refresh_episodes")),
                       (*table.split(".", 1), kind, Jsonb(details))).fetchone()
    return row is not None


def close_episode(conn: psycopg.Connection[Any], schema: str, table: str, kind: str) -> bool:
    """Close ``table``'s open episode of ``kind``; False if none was open."""
    row = conn.execute(sql.SQL("DELETE FROM {} WHERE table_schema = %s AND table_name = %s AND kind = %s RETURNING 1")
                       .format(ident(schema, "refresh_episodes")), (*table.split(".", 1), kind)).fetchone()
    return row is not None


def last_data_as_of(conn: psycopg.Connection[Any], schema: str, table: str) -> datetime | None:
    """The read snapshot of ``table``'s last successful publish (or its time), None if never published."""
    row = conn.execute(sql.SQL("SELECT coalesce(data_as_of, last_success) FROM {} WHERE table_schema = %s"
                               " AND table_name = %s").format(ident(schema, "refresh_freshness")),
                       table.split(".", 1)).fetchone()
    return None if row is None else row[0]
