"""The Supabase-like server is what it claims (tests/supabase_like.py): the suite reaches it through PgBouncer in
session mode, over TLS, as a role that is not a superuser and carries a statement_timeout, and the tables the
refresh creates get row-level security with a policy, which survives a reload. Skipped unless the suite runs
through it (the second pass of ./dev test)."""

from __future__ import annotations

import os
from typing import Any

import psycopg
import pytest
from psycopg import sql

from blocks import BigQuerySource
from flows.refresh_table import refresh_table
from tasks.registry import register_table
from tests import supabase_like
from tests.bqdata import put_table
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

SERVER = supabase_like.behind(os.environ.get("BQ_REFRESH_DATABASE_URL", ""))
pytestmark = pytest.mark.skipif(SERVER is None, reason="the suite does not run through the Supabase-like server"
                                " (./dev test's second pass does: python -m tests.supabase_like start)")


@pytest.fixture
def server() -> supabase_like.SupabaseLike:
    assert SERVER is not None
    return SERVER


def pooler_console(server: supabase_like.SupabaseLike, command: str) -> list[dict[str, str]]:
    """Run ``command`` on the session pooler's admin console (simple query protocol only) as the suite's role."""
    console = server.uri().replace(f"/{supabase_like.DATABASE}?", "/pgbouncer?")
    with psycopg.connect(console, autocommit=True) as conn:
        result = conn.pgconn.exec_(command.encode())
        names = [(result.fname(i) or b"").decode() for i in range(result.nfields)]
        return [{names[i]: (result.get_value(t, i) or b"").decode() for i in range(result.nfields)}
                for t in range(result.ntuples)]


def test_the_suite_connects_through_the_session_pooler_over_tls_as_no_superuser(
    server: supabase_like.SupabaseLike, pg: psycopg.Connection[Any],
) -> None:
    assert pg.info.port == server.pooler_port
    row = pg.execute("SELECT inet_server_port(), current_user, ssl FROM pg_stat_ssl"
                     " WHERE pid = pg_backend_pid()").fetchone()
    assert row == (server.server_port, supabase_like.APP_ROLE, True)  # the pooler's leg to the server: TLS
    assert pg.pgconn.ssl_in_use  # the client's leg to the pooler: TLS
    pools = [p for p in pooler_console(server, "SHOW POOLS") if p["user"] == supabase_like.APP_ROLE]
    assert pools and {p["pool_mode"] for p in pools} == {"session"}
    role = pg.execute("SELECT rolsuper, rolbypassrls, rolcreaterole, rolcanlogin FROM pg_roles"
                      " WHERE rolname = current_user").fetchone()
    assert role == (False, False, True, True)
    owner = pg.execute("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'sqp'").fetchone()
    assert owner == (supabase_like.APP_ROLE,)
    others = pg.execute("SELECT rolname, rolcanlogin, rolconfig FROM pg_roles WHERE rolname IN"
                        " ('anon', 'authenticated') ORDER BY 1").fetchall()
    assert others == [("anon", False, ["statement_timeout=3s"]),
                      ("authenticated", False, ["statement_timeout=8s"])]


def test_a_fresh_session_of_the_role_has_its_statement_timeout(server: supabase_like.SupabaseLike) -> None:
    with psycopg.connect(server.uri(), autocommit=True) as conn:
        row = conn.execute("SELECT setting, source FROM pg_settings WHERE name = 'statement_timeout'").fetchone()
    assert row is not None and row[1] == "user"  # set on the role (ALTER ROLE ... SET), as on Supabase
    with psycopg.connect(server.uri(), autocommit=True) as conn:
        shown = conn.execute("SHOW statement_timeout").fetchone()
    assert shown == (server.statement_timeout,)


@pytest.mark.parametrize("sslmode", ["require", "verify-full"])
def test_tls_is_required_and_verifiable(server: supabase_like.SupabaseLike, sslmode: str) -> None:
    for uri in (server.uri(sslmode=sslmode), server.direct_uri(sslmode=sslmode)):
        with psycopg.connect(uri, autocommit=True) as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(server.direct_uri(sslmode="disable")).close()


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_a_table_the_refresh_creates_has_row_level_security_with_a_policy_through_a_reload(
    server: supabase_like.SupabaseLike, source: BigQuerySource, registry: str, pg: psycopg.Connection[Any],
) -> None:
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(300))
    register_table(pg, registry, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    target = sql.Identifier(registry, "sqp")

    def security() -> tuple[Any, ...]:
        row = pg.execute("SELECT c.relrowsecurity, c.relforcerowsecurity, c.relowner::regrole::text,"
                         " array_agg(p.policyname || ':' || p.cmd || ':' || array_to_string(p.roles, ','))"
                         " FROM pg_class c LEFT JOIN pg_policies p ON p.schemaname = %s AND p.tablename = c.relname"
                         " WHERE c.oid = %s::regclass GROUP BY 1, 2, 3",
                         (registry, target.as_string(pg))).fetchone()
        assert row is not None
        return tuple(row)

    def read_as_authenticated() -> int:
        with pg.transaction():
            pg.execute("SET LOCAL ROLE authenticated")
            row = pg.execute(sql.SQL("SELECT count(*) FROM {}").format(target)).fetchone()
        return int(row[0]) if row else -1

    assert refresh_table("sqp")["status"] == "success"
    expected = (True, False, supabase_like.APP_ROLE, ["authenticated_read:SELECT:authenticated"])
    assert security() == expected
    pg.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO authenticated").format(sql.Identifier(registry)))
    pg.execute(sql.SQL("GRANT SELECT ON {} TO authenticated").format(target))
    assert read_as_authenticated() == 300  # the policy lets a dashboard role read what the refresh wrote

    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(320))
    reload = refresh_table("sqp", full_refresh=True)
    assert reload["status"] == "success", reload
    assert security() == expected
    assert read_as_authenticated() == 320
