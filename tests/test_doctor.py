"""bq-refresh doctor, the preflight: one line per check, OK or the fix, each shown here with a set-up that makes
it fail (or warn) and the exact line it prints; and `tables add` refusing a source that would fail at 02:00.

The PostgreSQL lines depend on the server this pass runs against: the embedded one (the tests' superuser, no TLS
over TCP) shows the role and TLS warnings; the Supabase-like one (a non-superuser owner, TLS, no event-trigger
right) shows the others. Both passes run in CI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from psycopg import sql

from blocks import BigQuerySource
from bq_refresh.settings import Settings
from tasks import doctor
from tasks.migrations import apply_migrations
from tasks.registry import list_entries, register_table
from tests.bqdata import SHORT, bq_schema, put_table
from tests.conftest import ROOT
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.emulator]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env={**os.environ, "COLUMNS": "80"},
                          capture_output=True, text=True, timeout=300)


def lines(pg: psycopg.Connection[Any], env: Settings, targets: list[tuple[str, str]]) -> dict[str, str]:
    return {c["name"]: doctor.line(c) for c in doctor.postgres_checks(
        pg, staging_schema=env.staging_schema, targets=targets, session_timeouts=env.session_timeouts)}


def test_the_source_lines_name_what_is_wrong_and_tables_add_refuses_it(
    env: Settings, pg: psycopg.Connection[Any], source: BigQuerySource,
) -> None:
    s = env.schema_name
    apply_migrations(pg, s)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(20))
    floats = bq_schema([("id", "FLOAT64"), ("updated_at", "TIMESTAMP")])
    client = source.get_bigquery_client()
    client.query(f"CREATE TABLE `{source.table_ref('floaty')}` (id FLOAT64, updated_at TIMESTAMP)", retry=SHORT,
                 job_retry=None).result(retry=SHORT)
    assert floats  # the schema above, as the DDL makes it
    register_table(pg, s, "good", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    register_table(pg, s, "missing", {"source": "nope", "key": ["id"], "mode": "full"})
    register_table(pg, s, "typo", {"source": "sqp", "key": SQP_KEY, "cursor": "updatd_at"})
    register_table(pg, s, "floaty", {"source": "floaty", "key": ["id"], "cursor": "updated_at"})
    ref = source.table_ref("sqp")

    done = cli("doctor", "--json")
    assert done.returncode == 1, done.stderr
    by = {c["name"]: doctor.line(c) for c in json.loads(done.stdout)["checks"]}
    assert by[f"source {s}.good"] == f"OK      source {s}.good: {ref} is a TABLE, 20 rows" or by[
        f"source {s}.good"].startswith(f"OK      source {s}.good: {ref} is a TABLE in ")
    assert by[f"columns {s}.good"] == (f"OK      columns {s}.good: key start_date, asin, search_query, cursor updated_at"
                                       " exist with usable types")
    assert by[f"read session {s}.good"] == f"OK      read session {s}.good: opened (1 stream(s))"
    assert by[f"source {s}.missing"] == (f"FAIL    source {s}.missing: {source.table_ref('nope')} not found in BigQuery:"
                                         f" check the table's source (bq-refresh tables set {s}.missing --source ...)")
    assert by[f"columns {s}.typo"] == (f"FAIL    columns {s}.typo: cursor column 'updatd_at' not in {ref} (columns:"
                                       " start_date, asin, search_query, impressions, click_share, median_price,"
                                       " updated_at)")
    assert by[f"columns {s}.floaty"] == (f"FAIL    columns {s}.floaty: key column 'id' is FLOAT NULLABLE: not usable"
                                         " as a key") or by[f"columns {s}.floaty"] == (
        f"FAIL    columns {s}.floaty: key column 'id' is FLOAT64 NULLABLE: not usable as a key")
    assert by["bigquery identity"].startswith("OK      bigquery identity: the emulator at http")
    # Off a terminal too, the text form prints the same lines.
    text = cli("doctor").stdout.splitlines()
    assert by[f"columns {s}.typo"] in text and by[f"source {s}.missing"] in text

    # tables add runs the source lines first: a typo is refused now (exit 2, one line), nothing registered.
    refused = cli("tables", "add", "later", "--source", "sqp", "--key", ",".join(SQP_KEY), "--cursor", "updatd_at")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: {s}.later: not registered: cursor column 'updatd_at' not in {ref} (columns: start_date, asin,"
        " search_query, impressions, click_share, median_price, updated_at) (--no-check registers without looking at"
        " BigQuery)"]
    assert f"{s}.later" not in {e.name for e in list_entries(pg, s)}
    assert cli("tables", "add", "later", "--source", "sqp", "--key", ",".join(SQP_KEY), "--cursor",
               "updated_at").returncode == 0


def test_the_postgres_lines_show_each_problem_with_its_fix(
    env: Settings, pg: psycopg.Connection[Any], registry: str,
) -> None:
    s = registry
    me = pg.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    assert me is not None
    role, superuser = str(me[0]), bool(me[1])
    base = lines(pg, env, [])
    assert re.fullmatch(r"OK      postgres version: PostgreSQL 1[5-9][.0-9]*( \(.*\))?", base["postgres version"])
    if superuser:  # the embedded server: the tests' superuser, over TCP without TLS
        assert base["role"] == f"WARN    role: {role}: superuser: give the refresh a role of its own (bq-refresh role-sql)"
        assert base["tls"] in ("WARN    tls: off: the connection is not encrypted; add sslmode=require (or verify-full)"
                               " to BQ_REFRESH_DATABASE_URL", "OK      tls: a local socket (no TLS needed)")
        assert base["event trigger"] == "OK      event trigger: may create the auto-registration event trigger"
    else:  # the Supabase-like server: postgres is no superuser, TLS is required
        assert re.fullmatch(r"OK      tls: on \(TLSv1\.[23]\)", base["tls"]), base["tls"]
        assert base["role"] == f"OK      role: {role}: createrole"
        assert base["event trigger"] == (f"WARN    event trigger: {role} may not create event triggers (superuser"
                                         " only): tables are registered with bq-refresh tables add, not on CREATE TABLE")
    assert base["targets"] == ("OK      targets: 0 registered target(s): owned or not made yet, row-level security"
                               " lets the refresh see every row")

    # Role timeouts are reported with the refresh's own.
    pg.execute(sql.SQL("ALTER ROLE {} SET lock_timeout = '7s'").format(sql.Identifier(role)))
    try:
        timeouts = lines(pg, env, [])["timeouts"]
    finally:
        pg.execute(sql.SQL("ALTER ROLE {} RESET lock_timeout").format(sql.Identifier(role)))
    assert "the role or database sets lock_timeout=7s" in timeouts and "every session of the refresh sets its own" \
        " (statement_timeout " in timeouts, timeouts

    # A target owned by someone else (warn), then one whose row-level security hides rows from the refresh (fail).
    other = f"other_{s[-8:]}"
    try:
        pg.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(other)))
    except psycopg.errors.InsufficientPrivilege:
        pytest.skip("this pass's role may not create roles")
    try:
        pg.execute(sql.SQL("GRANT {} TO current_user").format(sql.Identifier(other)))
        pg.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA {} TO {}").format(sql.Identifier(s), sql.Identifier(other)))
        pg.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(sql.Identifier(s, "theirs")))
        pg.execute(sql.SQL("ALTER TABLE {} DISABLE ROW LEVEL SECURITY").format(sql.Identifier(s, "theirs")))  # Supabase-like
        pg.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(sql.Identifier(s, "theirs"), sql.Identifier(other)))
        pg.execute(sql.SQL("REVOKE {} FROM current_user").format(sql.Identifier(other)))
        theirs = lines(pg, env, [(s, "theirs")])["targets"]
        if superuser:  # a superuser has every role's rights: it may rebuild any table's indexes
            assert theirs.startswith("OK      targets: 1 registered target(s)")
        else:
            assert theirs == (f"WARN    targets: {role} does not own {s}.theirs: their first load stages (no direct"
                              " load) and their indexes are never dropped and rebuilt")
            pg.execute(sql.SQL("GRANT {} TO current_user").format(sql.Identifier(other)))
            pg.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(other)))
            pg.execute(sql.SQL("ALTER TABLE {} ENABLE ROW LEVEL SECURITY").format(sql.Identifier(s, "theirs")))
            pg.execute("RESET ROLE")
            pg.execute(sql.SQL("REVOKE {} FROM current_user").format(sql.Identifier(other)))
            # (SELECT may be given by the Supabase-like server's own read policy for authenticated, a role of postgres)
            assert re.fullmatch(re.escape(
                f"FAIL    targets: target {s}.theirs has row-level security on and {role} does not own it, and no policy"
                f" gives {role} every row for ") + "(SELECT, )?" + re.escape(
                "INSERT, UPDATE, DELETE: rows its policies hide would be left stale (neither updated nor deleted) while"
                f' every check passes. Add CREATE POLICY bq_refresh_all ON "{s}"."theirs" FOR ALL TO "{role}" USING'
                " (true) WITH CHECK (true); (bq-refresh role-sql writes it for a dedicated role)"),
                lines(pg, env, [(s, "theirs")])["targets"])
            # A staging schema the refresh may not create tables in.
            pg.execute(sql.SQL("GRANT {} TO current_user").format(sql.Identifier(other)))
            pg.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(env.staging_schema)))
            pg.execute(sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(sql.Identifier(env.staging_schema),
                                                                    sql.Identifier(other)))
            pg.execute(sql.SQL("REVOKE {} FROM current_user").format(sql.Identifier(other)))
            assert lines(pg, env, [])["staging schema"] == (
                f"FAIL    staging schema: {role} may not create tables in {env.staging_schema}: GRANT CREATE ON SCHEMA"
                f' "{env.staging_schema}" TO "{role}";')
    finally:
        pg.execute(sql.SQL("GRANT {} TO current_user").format(sql.Identifier(other)))
        pg.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(env.staging_schema)))
        pg.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(s, "theirs")))
        pg.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(other)))
        pg.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(other)))
