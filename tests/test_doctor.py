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
from blocks.resources import Resources, resolve_resources
from bq_refresh.settings import Settings
from tasks import doctor
from tasks.migrations import apply_migrations
from tasks.registry import list_entries, register_table
from tests.bqdata import SHORT, bq_schema, put_table
from tests.conftest import ROOT
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.emulator]
# The emulator's words for a column that is not there (BigQuery's own are "Unrecognized name: no_such_column at [1:8]")
BAD_COLUMN = 'Query execution failed: Binder Error: Referenced column "no_such_column" not found in FROM clause!'



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


# --- each remaining check with a set-up that makes it fail, and the exact line ------------------------------------

def resources_with(env: Settings, **update: Any) -> Resources:
    return resolve_resources(env.model_copy(update=update))


@pytest.mark.once
def test_identity_without_credentials_says_how_to_give_them(env: Settings, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Any) -> None:
    """Real Google's endpoints (no emulator), no key, and GOOGLE_APPLICATION_CREDENTIALS naming a file not there."""
    missing = tmp_path / "key.json"
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(missing))
    res = resources_with(env, bigquery_api_endpoint=None, bigquery_storage_endpoint=None)
    assert doctor.line(doctor.identity(res)) == (
        f"FAIL    bigquery identity: no usable credentials (File {missing} was not found.): set"
        " GOOGLE_APPLICATION_CREDENTIALS_JSON to a service account key (or GOOGLE_APPLICATION_CREDENTIALS to its file)")


@pytest.mark.once
def test_identity_without_credentials_fails_doctor_through_the_cli_with_every_source_line(
    env: Settings, pg: psycopg.Connection[Any], tmp_path: Any,
) -> None:
    """The same through the real entry point: exit 1, --json, and each table's source line says the same instead of
    a traceback."""
    s = env.schema_name
    apply_migrations(pg, s)
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    missing = tmp_path / "key.json"
    bare = {k: v for k, v in os.environ.items() if k not in ("BIGQUERY_API_ENDPOINT", "BIGQUERY_STORAGE_ENDPOINT")}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "doctor", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**bare, "GOOGLE_APPLICATION_CREDENTIALS": str(missing)})
    assert done.returncode == 1, done.stderr[-3000:]
    by = {c["name"]: doctor.line(c) for c in json.loads(done.stdout)["checks"]}
    why = (f"no usable credentials (File {missing} was not found.): set GOOGLE_APPLICATION_CREDENTIALS_JSON to a"
           " service account key (or GOOGLE_APPLICATION_CREDENTIALS to its file)")
    assert by["bigquery identity"] == f"FAIL    bigquery identity: {why}"
    assert by[f"source {s}.sqp"] == f"FAIL    source {s}.sqp: {why}"


@pytest.mark.once
def test_a_read_session_refused_names_the_permission_and_the_role(
    env: Settings, pg: psycopg.Connection[Any], source: BigQuerySource,
) -> None:
    """The table exists (the emulator's REST API), the Storage Read API refuses the session as BigQuery does without
    bigquery.readsessions.create (PERMISSION_DENIED, the stand-in)."""
    from tests.storage_standin import StorageStandIn

    s = env.schema_name
    apply_migrations(pg, s)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(5))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    (entry,) = list_entries(pg, s)
    denied = (f"request failed: the user does not have 'bigquery.readsessions.create' permission for"
              f" 'projects/{source.project_id}'")
    with StorageStandIn() as standin:
        standin.fail_create("PERMISSION_DENIED").message = denied
        checks = doctor.source_checks(resources_with(env, bigquery_storage_endpoint=standin.target), entry)
    by = {c["name"]: doctor.line(c) for c in checks}
    assert by[f"read session {s}.sqp"] == (
        f"FAIL    read session {s}.sqp: permission denied reading {source.table_ref('sqp')}: {denied}: grant the"
        " identity roles/bigquery.readSessionUser on the project")
    assert by[f"source {s}.sqp"].startswith("OK      ")  # the table itself is there and readable by REST


@pytest.mark.once
def test_a_query_source_that_does_not_run_is_refused_with_bigquerys_words(
    env: Settings, pg: psycopg.Connection[Any], source: BigQuerySource,
) -> None:
    s = env.schema_name
    apply_migrations(pg, s)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(5))
    table = source.table_ref("sqp")
    register_table(pg, s, "good", {"query": f"SELECT * FROM `{table}`", "key": SQP_KEY, "mode": "full"})
    register_table(pg, s, "bad", {"query": f"SELECT no_such_column FROM `{table}`", "key": SQP_KEY, "mode": "full"})
    lines_ = {c["name"]: doctor.line(c) for e in list_entries(pg, s)
              for c in doctor.source_checks(resolve_resources(env), e)}
    assert re.fullmatch(rf"OK      source {s}\.good: query source: dry run ok \(\d+ bytes\)", lines_[f"source {s}.good"])
    assert lines_[f"source {s}.bad"] == (f"FAIL    source {s}.bad: the query does not run: {BAD_COLUMN}: fix it"
                                         f""" (bq-refresh tables set {s}.bad --params '{{"query": "..."}}')""")


@pytest.mark.once
@pytest.mark.parametrize(("number", "version", "expected"), [
    (120017, "12.17", "FAIL    postgres version: PostgreSQL 12.17: bq-refresh needs 13 or later"),
    (130000, "13.0", "OK      postgres version: PostgreSQL 13.0"),
    (170002, "17.2 (Debian 17.2-1)", "OK      postgres version: PostgreSQL 17.2 (Debian 17.2-1)"),
])
def test_the_server_version_line(number: int, version: str, expected: str) -> None:
    """No server older than 13 runs in the tests: the line is the pure decision over what the server reports."""
    assert doctor.line(doctor.version_check(number, version)) == expected


def test_the_timeouts_line_reports_the_roles_own_beside_the_refreshs(
    env: Settings, pg: psycopg.Connection[Any], registry: str,
) -> None:
    role = str(pg.execute("SELECT current_user").fetchone()[0])  # type: ignore[index]
    own = ", ".join(f"{k} {v} ms" for k, v in env.session_timeouts.items())
    names = ("statement_timeout", "idle_in_transaction_session_timeout")
    before = pg.execute(  # the role's own (the Supabase-like server's role has a statement_timeout): put back after
        "SELECT c FROM pg_db_role_setting s, unnest(s.setconfig) c WHERE s.setdatabase = 0"
        " AND s.setrole = (SELECT oid FROM pg_roles WHERE rolname = current_user)").fetchall()
    pg.execute(sql.SQL("ALTER ROLE {} SET statement_timeout = '8s'").format(sql.Identifier(role)))
    pg.execute(sql.SQL("ALTER ROLE {} SET idle_in_transaction_session_timeout = '9s'").format(sql.Identifier(role)))
    try:
        timeouts = lines(pg, env, [])["timeouts"]
    finally:
        for name in names:
            pg.execute(sql.SQL("ALTER ROLE {} RESET {}").format(sql.Identifier(role), sql.Identifier(name)))
        for (setting,) in before:
            name, _, value = str(setting).partition("=")
            if name in names:
                pg.execute(sql.SQL("ALTER ROLE {} SET {} = {}").format(sql.Identifier(role), sql.Identifier(name),
                                                                     sql.Literal(value)))
    settings = pg.execute(
        "SELECT string_agg(c, ', ' ORDER BY c) FROM pg_db_role_setting s, unnest(s.setconfig) c WHERE s.setrole = 0"
        " AND s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND split_part(c, '=', 1) IN ('statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout')"
    ).fetchone()
    assert settings is not None and settings[0] is None, "the database itself sets timeouts: the line would differ"
    assert timeouts == (f"OK      timeouts: the role or database sets idle_in_transaction_session_timeout=9s,"
                        f" statement_timeout=8s; every session of the refresh sets its own ({own})")
