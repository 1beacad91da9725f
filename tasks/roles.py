"""The least-privilege role of the refresh, as a SQL script generated from the registry.

What the role may do, and nothing more:
- log in; no superuser, no CREATEDB/CREATEROLE/REPLICATION, no BYPASSRLS (row-level security applies);
- read and write the registry's own tables (registry, audit log, checkpoints, quarantine, alerts): they keep
  row-level security on (migration 007, so that dashboard roles read none of them), and this role gets a policy
  of its own on each (the owner needs none);
- own its staging schema (it creates and drops its UNLOGGED staging tables there);
- write only the registered targets: SELECT/INSERT/UPDATE/DELETE on each target that exists (and a policy of its
  own on a target with row-level security on); CREATE in the target's schema only where the target does not exist
  yet (the first run creates it and owns it);
- refresh the materialized views downstream of its targets: MAINTAIN on PostgreSQL 17+, ownership before.

Migrations (`bq-refresh init`) stay with an administrator: the DDL event trigger needs a superuser.
The script sets no password: `ALTER ROLE ... PASSWORD` is yours to run, so no secret lands in a file.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from tasks.migrations import system_tables
from tasks.registry import list_entries


def _q(conn: psycopg.Connection[Any], composed: sql.Composable) -> str:
    return composed.as_string(conn)


def least_privilege_sql(conn: psycopg.Connection[Any], registry_schema: str, staging_schema: str, role: str) -> str:
    """Render the script for ``role`` from the registry in ``registry_schema`` (read, not changed)."""
    r = sql.Identifier(role)
    db = conn.execute("SELECT current_database(), current_setting('server_version_num')::int").fetchone()
    assert db is not None
    database, version = str(db[0]), int(db[1])
    lines = [
        f"-- bq-refresh least-privilege role {role!r}: generated from the registry in schema {registry_schema!r}.",
        "-- Run as an administrator; rerun after registering new tables. No password here: set it yourself.",
        "DO $bqr$ BEGIN",
        f"  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {sql.Literal(role).as_string(conn)}) THEN",
        f"    {_q(conn, sql.SQL('CREATE ROLE {} LOGIN').format(r))};",
        "  END IF;",
        # Only a superuser may name these attributes at all before PostgreSQL 16, even to take them away: an
        # administrator without superuser rights (Supabase's postgres) runs the script when there is nothing to take.
        f"  IF EXISTS (SELECT FROM pg_roles WHERE rolname = {sql.Literal(role).as_string(conn)}"
        " AND (rolsuper OR rolreplication OR rolbypassrls)) THEN",
        f"    {_q(conn, sql.SQL('ALTER ROLE {} NOSUPERUSER NOREPLICATION NOBYPASSRLS').format(r))};",
        "  END IF;",
        # Handing the staging schema (and older materialized views) to the role needs membership in it, which an
        # administrator without superuser rights does not get by creating the role.
        f"  IF NOT pg_has_role(current_user, {sql.Literal(role).as_string(conn)}, 'MEMBER') THEN",
        f"    {_q(conn, sql.SQL('GRANT {} TO CURRENT_USER').format(r))};",
        "  END IF;",
        "END $bqr$;",
        _q(conn, sql.SQL("ALTER ROLE {} LOGIN NOCREATEDB NOCREATEROLE;").format(r)),
        _q(conn, sql.SQL("GRANT CONNECT ON DATABASE {} TO {};").format(sql.Identifier(database), r)),
        "-- the registry, audit, checkpoint, quarantine and alert tables",
        _q(conn, sql.SQL("GRANT USAGE ON SCHEMA {} TO {};").format(sql.Identifier(registry_schema), r)),
        _q(conn, sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {} TO {};").format(
            sql.Identifier(registry_schema), r)),
        _q(conn, sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {} TO {};").format(
            sql.Identifier(registry_schema), r)),
        "-- row-level security is on for those tables (no dashboard role reads them): this role's own policy",
        *_system_table_policies(conn, registry_schema, role),
        "-- its own staging schema",
        _q(conn, sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {};").format(sql.Identifier(staging_schema), r)),
        _q(conn, sql.SQL("ALTER SCHEMA {} OWNER TO {};").format(sql.Identifier(staging_schema), r)),
        "-- the registered targets, and nothing else",
    ]
    schemas_done: set[str] = set()
    targets: list[tuple[str, str]] = []
    for entry in list_entries(conn, registry_schema):
        spec = entry.spec()
        target_schema, target_table = spec.target.split(".", 1) if spec.target else (entry.table_schema, entry.table_name)
        targets.append((target_schema, target_table))
        if target_schema not in schemas_done:
            schemas_done.add(target_schema)
            lines.append(_q(conn, sql.SQL("GRANT USAGE ON SCHEMA {} TO {};").format(sql.Identifier(target_schema), r)))
        target = sql.Identifier(target_schema, target_table)
        rls = conn.execute("SELECT relrowsecurity FROM pg_class WHERE oid = to_regclass(%s)",
                           (_q(conn, target),)).fetchone()
        if rls is not None:
            lines.append(_q(conn, sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {} TO {};").format(target, r)))
            if rls[0]:  # the users' policies are for their readers; the refresh reads and writes every row
                lines.append(f"-- {target_schema}.{target_table} has row-level security on: a policy for this role")
                lines += _full_access_policy(conn, target, role)
        else:
            lines.append(f"-- {target_schema}.{target_table} does not exist yet: the first run creates (and owns) it")
            lines.append(_q(conn, sql.SQL("GRANT CREATE ON SCHEMA {} TO {};").format(sql.Identifier(target_schema), r)))
    views = _downstream_matviews(conn, targets)
    if views:
        lines.append("-- materialized views downstream of the targets: the refresh refreshes them")
    for schema, name in views:
        if version >= 170000:
            lines.append(_q(conn, sql.SQL("GRANT MAINTAIN ON TABLE {} TO {};").format(sql.Identifier(schema, name), r)))
        else:  # before 17 only the owner may REFRESH MATERIALIZED VIEW
            lines.append(_q(conn, sql.SQL("ALTER MATERIALIZED VIEW {} OWNER TO {};").format(
                sql.Identifier(schema, name), r)))
    return "\n".join(lines) + "\n"


def _full_access_policy(conn: psycopg.Connection[Any], table: sql.Identifier, role: str) -> list[str]:
    """DROP + CREATE POLICY (so the script can run again) giving ``role`` every row of ``table``."""
    policy = sql.Identifier(f"bq_refresh_{role}"[:63])
    return [_q(conn, sql.SQL("DROP POLICY IF EXISTS {} ON {};").format(policy, table)),
            _q(conn, sql.SQL("CREATE POLICY {} ON {} TO {} USING (true) WITH CHECK (true);").format(
                policy, table, sql.Identifier(role)))]


def _system_table_policies(conn: psycopg.Connection[Any], registry_schema: str, role: str) -> list[str]:
    """The role's policy on each system table that exists."""
    lines = []
    for table in system_tables():
        name = sql.Identifier(registry_schema, table)
        if conn.execute("SELECT to_regclass(%s) IS NOT NULL", (_q(conn, name),)).fetchone() == (True,):
            lines += _full_access_policy(conn, name, role)
    return lines


def _downstream_matviews(conn: psycopg.Connection[Any], targets: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if not targets:
        return []
    rows = conn.execute(
        """
        WITH RECURSIVE roots AS (
            SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE (n.nspname, c.relname) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
        ), deps AS (
            SELECT DISTINCT r.ev_class AS oid FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
            WHERE d.refobjid IN (SELECT oid FROM roots) AND r.ev_class <> d.refobjid
            UNION
            SELECT DISTINCT r.ev_class FROM deps JOIN pg_depend d ON d.refobjid = deps.oid
            JOIN pg_rewrite r ON r.oid = d.objid WHERE r.ev_class <> d.refobjid
        )
        SELECT n.nspname, c.relname FROM deps JOIN pg_class c ON c.oid = deps.oid
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'm' ORDER BY 1, 2
        """,
        ([t[0] for t in targets], [t[1] for t in targets]),
    ).fetchall()
    return [(str(a), str(b)) for a, b in rows]
