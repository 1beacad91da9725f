"""Versioned, idempotent migrations of the refresh system's own schema."""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import errors, sql

from bq_refresh.errors import ConfigError
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
_CREATED_RELATION = re.compile(
    r"CREATE\s+(?:OR\s+REPLACE\s+)?(?:TABLE\s+IF\s+NOT\s+EXISTS|VIEW)\s+__SCHEMA__\.(\w+)", re.IGNORECASE)
# The migrations' record, made here rather than by a migration: its columns, for its DDL and its shape check.
RECORD_COLUMNS = {"version": "integer", "name": "text", "checksum": "text", "applied_at": "timestamp with time zone"}


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
    migrations = load_migrations()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('bq-refresh:migrate'))")
        done = _recorded(conn, schema)
        # Another tool's tables of the same names (an earlier sync's) stop init before it touches anything.
        _refuse_foreign_relations(conn, schema, migrations, done)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident(schema)))
        _create_record(conn, schema)
        for migration in migrations:
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


def _create_record(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " checksum TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())").format(ident(schema, "schema_migrations")))


def _recorded(conn: psycopg.Connection[Any], schema: str) -> dict[int, str]:
    """version -> checksum of the migrations applied to ``schema`` (none when it has no record yet).

    Raises:
        ConfigError: a ``schema_migrations`` of another tool is there.
    """
    record = _shapes(conn, schema, ["schema_migrations"]).get("schema_migrations")
    if record is None:
        return {}
    problems = shape_differences(record, Shape("r", RECORD_COLUMNS), Shape("r", RECORD_COLUMNS))
    if problems:
        raise ConfigError(_foreign_message(schema, {"schema_migrations": problems}), schema=schema)
    rows = conn.execute(sql.SQL("SELECT version, checksum FROM {}").format(ident(schema, "schema_migrations"))).fetchall()
    return {int(r[0]): str(r[1]) for r in rows}


@dataclass(frozen=True)
class Shape:
    """What the refresh's code relies on in one table or view of its schema."""

    kind: str  # pg_class.relkind: "r" table, "p" partitioned table, "v" view, "m" materialized view
    columns: dict[str, str]  # name -> format_type
    required: frozenset[str] = frozenset()  # NOT NULL columns without a default
    constraints: frozenset[str] = frozenset()  # CHECK and FOREIGN KEY definitions (pg_get_constraintdef)
    unique_keys: frozenset[str] = frozenset()  # unique indexes: "(a, b)" or "(a, b) WHERE <predicate>"


KIND_NAMES = {"r": "a table", "p": "a partitioned table", "v": "a view", "m": "a materialized view",
              "f": "a foreign table"}


def shape_differences(have: Shape, created: Shape, final: Shape) -> list[str]:
    """Why an existing relation cannot serve as one of the refresh's own (empty when it can).

    Args:
        have: the relation found in the schema.
        created: ours as the migration that creates it leaves it (later migrations add columns to it).
        final: ours after every migration (the types our code writes, the constraints it relies on).
    """
    if KIND_NAMES.get(have.kind) != KIND_NAMES.get(created.kind) and not {have.kind, created.kind} <= {"r", "p"}:
        return [f"it is {KIND_NAMES.get(have.kind, have.kind)}, bq-refresh's is {KIND_NAMES.get(created.kind)}"]
    problems = []
    missing = [c for c in created.columns if c not in have.columns]
    if missing:
        problems.append("missing columns " + ", ".join(missing))
    types = [f"{c} {have.columns[c]} (bq-refresh's: {t})" for c, t in final.columns.items()
             if c in have.columns and have.columns[c] != t]
    if types:
        problems.append("other types: " + ", ".join(types))
    unfilled = sorted(c for c in have.required if c not in final.columns)
    if unfilled:
        problems.append("NOT NULL without a default, which bq-refresh does not fill: " + ", ".join(unfilled))
    problems += [f"constraint {c} is not bq-refresh's" for c in sorted(have.constraints - final.constraints)]
    problems += [f"lacks {c}" for c in sorted(final.constraints - have.constraints)]
    problems += [f"no unique index on {k}" for k in sorted(created.unique_keys - have.unique_keys)]
    return problems


def _shapes(conn: psycopg.Connection[Any], schema: str, names: list[str] | None = None,
            *, as_schema: str | None = None) -> dict[str, Shape]:
    """The shapes of the tables and views named (every one when None) in ``schema``; in constraint texts a
    reference to ``schema`` reads as one to ``as_schema`` (a reference schema compared with the real one)."""
    params = {"schema": schema, "names": names}
    columns: dict[str, dict[str, str]] = {}
    kinds: dict[str, str] = {}
    required: dict[str, set[str]] = {}
    for rel, kind, col, typ, notnull, hasdef in conn.execute(
            "SELECT c.relname, c.relkind, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, a.atthasdef"
            " FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
            " WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND c.relnamespace = (SELECT oid FROM pg_namespace"
            " WHERE nspname = %(schema)s) AND (%(names)s::text[] IS NULL OR c.relname = ANY(%(names)s::text[]))"
            " ORDER BY c.relname, a.attnum", params):
        kinds[rel] = kind
        columns.setdefault(rel, {})[col] = typ
        if notnull and not hasdef:
            required.setdefault(rel, set()).add(col)
    constraints: dict[str, set[str]] = {}
    quoted = (_pg_quoted(conn, schema), _pg_quoted(conn, as_schema or schema))
    for rel, definition in conn.execute(
            "SELECT c.relname, pg_get_constraintdef(k.oid) FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid"
            " WHERE k.contype IN ('c', 'f') AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = %(schema)s)"
            " AND (%(names)s::text[] IS NULL OR c.relname = ANY(%(names)s::text[]))", params):
        constraints.setdefault(rel, set()).add(str(definition).replace(f"{quoted[0]}.", f"{quoted[1]}."))
    uniques: dict[str, set[str]] = {}
    for rel, cols, predicate in conn.execute(
            "SELECT c.relname, string_agg(a.attname::text, ', ' ORDER BY k.ord), pg_get_expr(i.indpred, i.indrelid)"
            " FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
            " CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indisunique AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = %(schema)s)"
            " AND (%(names)s::text[] IS NULL OR c.relname = ANY(%(names)s::text[]))"
            " GROUP BY i.indexrelid, c.relname, i.indpred, i.indrelid", params):
        uniques.setdefault(rel, set()).add(f"({cols})" + (f" WHERE {predicate}" if predicate else ""))
    return {rel: Shape(kinds[rel], cols, frozenset(required.get(rel, ())), frozenset(constraints.get(rel, ())),
                       frozenset(uniques.get(rel, ()))) for rel, cols in columns.items()}


def _refuse_foreign_relations(conn: psycopg.Connection[Any], schema: str, migrations: list[Migration],
                              done: dict[int, str]) -> None:
    """Stop, changing nothing, when ``schema`` holds a table or view with the name of one of ours that no applied
    migration made and whose shape differs from what ours would be (the earlier sync's ``refresh_audit_log``).

    ``CREATE TABLE IF NOT EXISTS`` would keep such a table silently and the refresh would fail on it at night, or
    write into another tool's table. One of the same shape (e.g. ours, its record lost) is kept, as before.

    Raises:
        ConfigError: naming the schema, each such relation and what differs, and what to do.
    """
    creators: dict[str, int] = {}
    for migration in migrations:
        for name in _CREATED_RELATION.findall(migration.text):
            creators.setdefault(name, migration.version)
    candidates = [name for name, version in creators.items() if version not in done]
    found = _shapes(conn, schema, candidates) if candidates else {}
    if not found:
        return
    snapshots, final = _reference_shapes(conn, schema, migrations)
    foreign = {}
    for name, have in found.items():
        problems = shape_differences(have, snapshots[creators[name]][name], final[name])
        if problems:
            foreign[name] = problems
    # A table kept as ours whose foreign key points at another tool's table would write into that one.
    for name, have in found.items():
        if name not in foreign:
            pointing = [other for other in foreign if any(
                f"REFERENCES {_pg_quoted(conn, schema)}.{_pg_quoted(conn, other)}(" in c for c in have.constraints)]
            if pointing:
                foreign[name] = [f"its foreign key points at {', '.join(pointing)}, which is not bq-refresh's"]
    if foreign:
        raise ConfigError(_foreign_message(schema, foreign), schema=schema, relations=sorted(foreign))


def _pg_quoted(conn: psycopg.Connection[Any], name: str) -> str:
    """``name`` as PostgreSQL prints it in a definition (quoted only where it must be)."""
    row = conn.execute("SELECT quote_ident(%s)", (name,)).fetchone()
    assert row is not None
    return str(row[0])


def _reference_shapes(conn: psycopg.Connection[Any], schema: str, migrations: list[Migration],
                      ) -> tuple[dict[int, dict[str, Shape]], dict[str, Shape]]:
    """Our shapes, from the migrations themselves: applied one by one to a scratch schema that is rolled back.
    Returns (shapes after each migration by version, shapes after all of them)."""
    scratch = f"bq_refresh_shape_{uuid.uuid4().hex[:12]}"
    snapshots: dict[int, dict[str, Shape]] = {}
    try:
        with conn.transaction() as savepoint:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident(scratch)))
            for migration in migrations:
                conn.execute(render(migration.text, scratch, scratch + "_staging").encode())
                snapshots[migration.version] = _shapes(conn, scratch, as_schema=schema)
            raise psycopg.Rollback(savepoint)
    except errors.InsufficientPrivilege as exc:
        raise ConfigError(f"schema {schema} holds tables with the names of bq-refresh's own that no bq-refresh"
                          " migration made; checking their shape needs a scratch schema (CREATE on the database:"
                          f" {exc.diag.message_primary}); run bq-refresh init as the schema's owner with that right",
                          schema=schema) from None
    return snapshots, snapshots[migrations[-1].version]


def _foreign_message(schema: str, foreign: dict[str, list[str]]) -> str:
    named = "; ".join(f"{schema}.{name}: {', '.join(problems)}" for name, problems in sorted(foreign.items()))
    first = sorted(foreign)[0]
    return (f"schema {schema} already holds {'a table' if len(foreign) == 1 else 'tables'} with the name of"
            f" bq-refresh's own but of another shape (another tool's, e.g. an earlier sync's): {named}. Nothing was"
            f" changed. Rename {'it' if len(foreign) == 1 else 'them'} away (ALTER TABLE {schema}.{first} RENAME TO"
            f" {first}_earlier; views on it follow) or keep bq-refresh's tables in a schema of their own"
            " (BQ_REFRESH_SCHEMA=bq_refresh), then run bq-refresh init again")


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
