"""The refresh system's own tables are not open to dashboard users: Supabase's Data API roles (anon,
authenticated) can neither read nor write the registry, audit log, alerts, checkpoints, quarantine, quality,
archive tables or the staging schema, even where the schema was exposed the way Supabase documents it; the
monitoring views are readable by a role that is granted them; the users' own tables stay as they were granted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from blocks import BigQuerySource
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.migrations import apply_migrations, system_tables
from tasks.registry import register_table
from tests.bqdata import put_table
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]

DATA_API_ROLES = ("anon", "authenticated")
# What docs/operations.md offers a dashboard role: the monitoring views, read with their owner's rights.
MONITORING_VIEWS = ("refresh_freshness", "refresh_success_rate", "data_quality_overview", "data_quality_by_table")


@pytest.fixture
def data_api_roles(pg: psycopg.Connection[Any]) -> tuple[str, ...]:
    """anon and authenticated as Supabase has them (NOLOGIN), which this connection can SET ROLE to.

    Created when missing, if this connection may create roles; kept afterwards (cluster-wide, and a concurrent
    session may use them too; on Supabase they always exist). Skips, saying why, where neither is possible.
    """
    me = pg.execute("SELECT current_user, rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user").fetchone()
    assert me is not None
    user, superuser, createrole = str(me[0]), bool(me[1]), bool(me[2])
    for role in DATA_API_ROLES:
        if pg.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
            if not (superuser or createrole):
                pytest.skip(f"role {role} does not exist and {user} may not create roles (no CREATEROLE)")
            try:
                pg.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
            except psycopg.errors.DuplicateObject:
                pass  # created meanwhile by a concurrent session
        if not superuser and pg.execute("SELECT pg_has_role(current_user, %s, 'MEMBER')", (role,)).fetchone() != (True,):
            try:
                pg.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(user)))
            except psycopg.errors.InsufficientPrivilege as exc:
                pytest.skip(f"{user} cannot SET ROLE {role}: {exc.diag.message_primary}")
    return DATA_API_ROLES


def as_role(pg: psycopg.Connection[Any], role: str, statement: sql.Composable) -> list[tuple[Any, ...]]:
    """Run one statement as ``role`` (SET LOCAL ROLE in its own transaction, rolled back on error)."""
    with pg.transaction():
        pg.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
        cur = pg.execute(statement)
        return cur.fetchall() if cur.description else [(cur.rowcount,)]


def first_column(pg: psycopg.Connection[Any], schema: str, table: str) -> str:
    row = pg.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum = 1",
                     (sql.Identifier(schema, table).as_string(pg),)).fetchone()
    assert row is not None
    return str(row[0])


def writes(pg: psycopg.Connection[Any], schema: str, table: str) -> dict[str, sql.Composable]:
    t, col = sql.Identifier(schema, table), sql.Identifier(first_column(pg, schema, table))
    return {
        "SELECT": sql.SQL("SELECT * FROM {} LIMIT 1").format(t),
        "INSERT": sql.SQL("INSERT INTO {} DEFAULT VALUES").format(t),
        "UPDATE": sql.SQL("UPDATE {} SET {} = {}").format(t, col, col),
        "DELETE": sql.SQL("DELETE FROM {}").format(t),
    }


@pytest.fixture
def exposed_like_supabase(env: Settings, pg: psycopg.Connection[Any], data_api_roles: tuple[str, ...]) -> Iterator[str]:
    """The registry's schema exposed to the Data API before ``init`` as Supabase's guide for a custom schema does
    it (USAGE, and default privileges giving anon/authenticated ALL on every table, sequence and function created
    later), and a staging schema someone opened to everyone beforehand. Yields the registry's schema."""
    schema, staging = env.schema_name, env.staging_schema
    roles = sql.SQL(", ").join(sql.Identifier(r) for r in data_api_roles)
    for name in (schema, staging):
        s = sql.Identifier(name)
        pg.execute(sql.SQL("CREATE SCHEMA {}").format(s))
        pg.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, roles))
        for kind in ("TABLES", "SEQUENCES", "FUNCTIONS"):
            pg.execute(sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT ALL ON {} TO {}").format(
                s, sql.SQL(kind), roles))
    pg.execute(sql.SQL("GRANT ALL ON SCHEMA {} TO PUBLIC").format(sql.Identifier(staging)))
    yield schema
    # The default privileges name the roles: they go with the schemas (the schema fixture drops those).


def test_system_tables_and_staging_are_closed_to_data_api_roles(
    env: Settings, pg: psycopg.Connection[Any], source: BigQuerySource, exposed_like_supabase: str,
) -> None:
    schema, staging = exposed_like_supabase, env.staging_schema
    apply_migrations(pg, schema, staging)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(200))
    register_table(pg, schema, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    assert refresh_table("sqp")["status"] == "success"
    # A table a run left in staging (a crashed run's), which the staging schema's default privileges grant to all.
    pg.execute(sql.SQL("CREATE TABLE {} (a int)").format(sql.Identifier(staging, "leftover__0123abcd")))

    present = [t for t in system_tables()
               if pg.execute("SELECT to_regclass(%s)", (sql.Identifier(schema, t).as_string(pg),)).fetchone() != (None,)]
    assert present == system_tables(), "every system table exists after init"
    refused: list[str] = []
    for role in DATA_API_ROLES:
        for table in present:
            for verb, statement in writes(pg, schema, table).items():
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                    as_role(pg, role, statement)
                refused.append(f"{role} {verb} {table}")
        for statement in writes(pg, staging, "leftover__0123abcd").values():
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for schema"):
                as_role(pg, role, statement)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for schema"):
            as_role(pg, role, sql.SQL("CREATE TABLE {} (a int)").format(sql.Identifier(staging, "mine")))
        for view in MONITORING_VIEWS:  # not granted to anyone by init
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                as_role(pg, role, sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, view)))
        # The users' table (created by the refresh in the exposed schema) keeps what the schema's owner gives it.
        assert pg.execute("SELECT has_table_privilege(%s, %s, 'SELECT')",
                          (role, sql.Identifier(schema, "sqp").as_string(pg))).fetchone() == (True,)
    assert len(refused) == len(DATA_API_ROLES) * len(present) * 4

    # The documented way for a dashboard: GRANT SELECT on the views it reads, to its role.
    for view in MONITORING_VIEWS:
        pg.execute(sql.SQL("GRANT SELECT ON {} TO authenticated").format(sql.Identifier(schema, view)))
    fresh = as_role(pg, "authenticated", sql.SQL("SELECT table_name, is_stale, rows_read_last_success FROM {}").format(
        sql.Identifier(schema, "refresh_freshness")))
    assert fresh == [("sqp", False, 200)]
    rate = as_role(pg, "authenticated", sql.SQL("SELECT table_name, success_rate, total_runs FROM {}").format(
        sql.Identifier(schema, "refresh_success_rate")))
    assert [(r[0], float(r[1]), r[2]) for r in rate] == [("sqp", 100.0, 1)]
    assert as_role(pg, "authenticated", sql.SQL("SELECT count(*) > 0 FROM {}").format(
        sql.Identifier(schema, "data_quality_overview"))) == [(True,)]
    assert as_role(pg, "authenticated", sql.SQL("SELECT DISTINCT table_name FROM {}").format(
        sql.Identifier(schema, "data_quality_by_table"))) == [("sqp",)]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_role(pg, "anon", sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, "refresh_freshness")))
    # ... and still nothing of the tables under them.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_role(pg, "authenticated", sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, "refresh_audit_log")))

    # A second init changes nothing of it.
    assert apply_migrations(pg, schema, staging).applied == []
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        as_role(pg, "anon", writes(pg, schema, "refresh_config")["SELECT"])


def test_row_level_security_holds_when_the_schema_is_opened_again(
    env: Settings, pg: psycopg.Connection[Any], source: BigQuerySource, exposed_like_supabase: str,
) -> None:
    """Supabase's recipe for exposing a schema, run after init ("GRANT ALL ON ALL TABLES/SEQUENCES IN SCHEMA ...
    TO anon, authenticated"), grants the system tables again; row-level security without a policy for those
    roles still shows them no row and lets them change none, while the refresh (the owner) goes on."""
    schema = exposed_like_supabase
    apply_migrations(pg, schema, env.staging_schema)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(50))
    register_table(pg, schema, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    assert refresh_table("sqp")["status"] == "success"
    for kind in ("TABLES", "SEQUENCES"):
        pg.execute(sql.SQL("GRANT ALL ON ALL {} IN SCHEMA {} TO anon, authenticated").format(
            sql.SQL(kind), sql.Identifier(schema)))

    flags = {r[0]: (r[1], r[2]) for r in pg.execute(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c"
        " WHERE c.relnamespace = %s::regnamespace AND c.relname = ANY(%s)", (schema, system_tables()))}
    assert flags == {t: (True, False) for t in system_tables()}, "RLS on, not forced (the owner is exempt)"
    counts = {t: pg.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, t))).fetchone()
              for t in system_tables()}
    assert all(counts[t] != (0,) for t in ("refresh_config", "refresh_audit_log", "refresh_checkpoints",
                                           "refresh_data_quality", "schema_migrations"))
    for role in DATA_API_ROLES:
        for table in system_tables():
            statements = writes(pg, schema, table)
            assert as_role(pg, role, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))) == [(0,)]
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                as_role(pg, role, statements["INSERT"])
            assert as_role(pg, role, statements["UPDATE"]) == [(0,)]
            assert as_role(pg, role, statements["DELETE"]) == [(0,)]
    assert {t: pg.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, t))).fetchone()
            for t in system_tables()} == counts
    again = refresh_table("sqp", full_refresh=True)  # the owner's refresh is unaffected
    assert again["status"] == "success" and again["rows_read"] == 50
