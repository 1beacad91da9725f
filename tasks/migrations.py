"""Versioned, idempotent migrations of the refresh system's own schema."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import errors, sql

from tasks.sqlnames import ident, quote_ident

log = logging.getLogger(__name__)

MIGRATIONS_PACKAGE = "bq_refresh.migrations"

AUTO_REGISTER_FUNCTION = """
CREATE OR REPLACE FUNCTION __SCHEMA__.auto_register_table_for_refresh()
RETURNS event_trigger AS $$
DECLARE
    obj record;
BEGIN
    FOR obj IN SELECT * FROM pg_event_trigger_ddl_commands()
    LOOP
        IF obj.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS')
           AND obj.schema_name = __SCHEMA_LITERAL__
           AND obj.object_type = 'table' THEN
            BEGIN
                -- Registered disabled: a table needs its source mapping before it can refresh.
                INSERT INTO __SCHEMA__.refresh_config (table_schema, table_name, is_enabled,
                        refresh_frequency_hours, priority, next_refresh_at)
                SELECT n.nspname, c.relname, false, 24, 100, CURRENT_TIMESTAMP + INTERVAL '24 hours'
                  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.oid = obj.objid AND c.relname NOT LIKE 'refresh\\_%'
                ON CONFLICT (table_schema, table_name) DO NOTHING;
            EXCEPTION WHEN others THEN
                RAISE WARNING 'bq-refresh auto-registration skipped %: %', obj.object_identity, SQLERRM;
            END;
        END IF;
    END LOOP;
END;
$$ LANGUAGE plpgsql;
"""


@dataclass(frozen=True)
class Migration:
    """One versioned SQL file."""

    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


@dataclass(frozen=True)
class MigrationReport:
    """What ``apply_migrations`` did."""

    applied: list[str]
    already_applied: list[str]
    event_trigger: str  # "created", "exists" or the reason it could not be created


def load_migrations() -> list[Migration]:
    """Read the packaged migration files, in version order."""
    found = []
    for entry in resources.files(MIGRATIONS_PACKAGE).iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append(Migration(version, entry.name, entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def render(text: str, schema: str, staging_schema: str | None = None) -> str:
    """Put the quoted schema names (and their string literals) into a migration's text: ``__SCHEMA__`` is the
    registry's schema, ``__STAGING__`` the staging schema (default: "<schema>_staging")."""
    staging = staging_schema or f"{schema}_staging"
    text = text.replace("__STAGING_LITERAL__", _literal(staging)).replace("__STAGING__", quote_ident(staging))
    return text.replace("__SCHEMA_LITERAL__", _literal(schema)).replace("__SCHEMA__", quote_ident(schema))


_CREATED_TABLE = re.compile(r"CREATE\s+TABLE\s+IF\s+NOT\s+EXISTS\s+__SCHEMA__\.(\w+)", re.IGNORECASE)


def system_tables() -> list[str]:
    """The tables of the refresh system's own schema: every table a migration creates, and the migrations'
    record. Its schema may hold the users' tables too (sqp), so this list, not the schema, says what is ours."""
    names = ["schema_migrations"]
    for migration in load_migrations():
        names += [n for n in _CREATED_TABLE.findall(migration.text) if n not in names]
    return names


def event_trigger_name(schema: str) -> str:
    return f"bq_refresh_auto_register_{hashlib.md5(schema.encode()).hexdigest()[:10]}"


def apply_migrations(conn: psycopg.Connection[Any], schema: str, staging_schema: str | None = None) -> MigrationReport:
    """Apply the migrations not yet recorded for ``schema``; a second run changes nothing.

    Runs under an advisory lock so two processes never migrate at once. The auto-registration
    event trigger needs superuser rights (Supabase's roles may lack them): without them the rest
    still applies and the report says why the trigger is missing. ``staging_schema`` (default
    "<schema>_staging") is created closed to everyone but its owner.
    """
    applied: list[str] = []
    already: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('bq-refresh:migrate'))")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident(schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                " checksum TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            ).format(ident(schema, "schema_migrations"))
        )
        rows = conn.execute(
            sql.SQL("SELECT version, checksum FROM {}").format(ident(schema, "schema_migrations"))
        ).fetchall()
        done = {int(r[0]): str(r[1]) for r in rows}
        for migration in load_migrations():
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    log.warning("migration %s changed after it was applied", migration.name)
                already.append(migration.name)
                continue
            conn.execute(render(migration.text, schema, staging_schema).encode())
            conn.execute(
                sql.SQL("INSERT INTO {} (version, name, checksum) VALUES (%s, %s, %s)").format(
                    ident(schema, "schema_migrations")
                ),
                (migration.version, migration.name, migration.checksum),
            )
            applied.append(migration.name)
        trigger_state = _ensure_event_trigger(conn, schema)
    return MigrationReport(applied, already, trigger_state)


def _ensure_event_trigger(conn: psycopg.Connection[Any], schema: str) -> str:
    name = event_trigger_name(schema)
    if conn.execute("SELECT 1 FROM pg_event_trigger WHERE evtname = %s", (name,)).fetchone():
        return "exists"
    try:
        with conn.transaction():  # a savepoint: a refusal must not undo the migrations
            conn.execute(render(AUTO_REGISTER_FUNCTION, schema).encode())
            conn.execute(
                sql.SQL(
                    "CREATE EVENT TRIGGER {} ON ddl_command_end WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS')"
                    " EXECUTE FUNCTION {}()"
                ).format(ident(name), ident(schema, "auto_register_table_for_refresh"))
            )
        return "created"
    except errors.InsufficientPrivilege as exc:
        reason = f"not created (this role may not create event triggers: {exc.diag.message_primary})"
        log.warning("auto-registration event trigger %s", reason)
        return reason
