"""The engine's own timeouts: a role's default statement_timeout (Supabase sets them per role) must not end the
refresh's own statements. Every session the refresh opens, psycopg and ADBC alike, sets statement_timeout
(REFRESH_STATEMENT_TIMEOUT_SECONDS, default the table's run timeout), lock_timeout (60 s) and
idle_in_transaction_session_timeout (10 min) itself; a value the URI gives in its options is kept."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
from pydantic import SecretStr

from blocks import BigQuerySource
from blocks.resources import resolve_resources
from bq_refresh.settings import Settings, load_settings
from flows.refresh_table import refresh_table
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, pg_rows, put_table, source_rows
from tests.test_engine import SQP_KEY, SQP_SCHEMA, T0, sqp_rows

PASSWORD = "timeouts-test-pw"


def as_role(uri: str, role: str) -> str:
    parts = urlsplit(uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{quote(role)}:{quote(PASSWORD)}@{host}"))


@pytest.fixture
def role_uri(pg: psycopg.Connection[Any], pg_uri: str) -> Iterator[str]:
    """A login role whose own default statement_timeout is 1 s (like a Supabase role's), owning what it creates."""
    role = f"bqr_role_{uuid.uuid4().hex[:8]}"
    try:
        pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
    except psycopg.errors.InsufficientPrivilege as exc:
        pytest.skip(f"this server's test role may not create roles ({exc}); the Supabase-like pass runs the whole"
                    " suite as a role with its own statement_timeout instead")
    try:
        db = pg.execute("SELECT current_database()").fetchone()
        assert db is not None
        pg.execute(f'GRANT CREATE ON DATABASE "{db[0]}" TO {role}')
        pg.execute(f"ALTER ROLE {role} SET statement_timeout = '1s'")
        uri = as_role(pg_uri, role)
        try:
            psycopg.connect(uri).close()
        except psycopg.OperationalError as exc:  # e.g. a pooler whose auth file knows only the suite's role
            pytest.skip(f"cannot log in as a new role through this server's front ({exc})")
        yield uri
    finally:
        pg.execute(f"GRANT {role} TO CURRENT_USER")  # dropping its objects without superuser needs its membership
        pg.execute(f"DROP OWNED BY {role} CASCADE")
        pg.execute(f"DROP ROLE {role}")


def release_when_waited_on(reader: psycopg.Connection[Any], uri: str, waits: list[bool], hold_s: float = 2.5) -> None:
    """Release ``reader``'s lock ``hold_s`` after the publish's merge is seen waiting on it (or after 120 s):
    the wait does not depend on how long the run takes to get there."""
    deadline = time.monotonic() + 120
    seen = False
    with psycopg.connect(uri, autocommit=True) as watch:
        while time.monotonic() < deadline and not seen:
            seen = bool(watch.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                      " AND query ILIKE 'WITH up AS (INSERT%'").fetchone())
            time.sleep(0.02)
    waits.append(seen)
    time.sleep(hold_s)
    reader.rollback()


def setting(conn: Any, name: str) -> str:
    if isinstance(conn, psycopg.Connection):
        row = conn.execute(f"SHOW {name}").fetchone()
    else:  # ADBC (which reads a result through COPY: no SHOW)
        with conn.cursor() as cur:
            cur.execute(f"SELECT current_setting('{name}')")
            row = cur.fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_a_role_statement_timeout_does_not_end_the_refresh_and_every_session_sets_its_own(
    env: Settings, role_uri: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BQ_REFRESH_DATABASE_URL", role_uri)
    monkeypatch.setenv("REFRESH_RETRIES", "0")
    s = env.schema_name
    with psycopg.connect(role_uri, autocommit=True) as plain:
        assert setting(plain, "statement_timeout") == "1s"  # the role's default is real
    res = resolve_resources(load_settings())
    for autocommit in (True, False):
        with res.target.connect(autocommit=autocommit) as conn:
            assert (setting(conn, "statement_timeout"), setting(conn, "lock_timeout"),
                    setting(conn, "idle_in_transaction_session_timeout")) == ("1h", "1min", "10min")
    adbc = res.target.connect_adbc()
    try:
        assert (setting(adbc, "statement_timeout"), setting(adbc, "lock_timeout")) == ("1h", "1min")
    finally:
        adbc.close()
    given = role_uri + ("&" if "?" in role_uri else "?") + "options=" + quote("-c statement_timeout=1500")
    try:
        with res.target.model_copy(update={"url": SecretStr(given)}).connect() as conn:
            assert setting(conn, "statement_timeout") == "1500ms"  # the user's own choice in the URI wins
    except psycopg.OperationalError as exc:  # PgBouncer (as Supavisor) refuses the options startup parameter
        assert "unsupported startup parameter: options" in str(exc), exc

    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(400))
    with psycopg.connect(role_uri, autocommit=True) as conn:
        apply_migrations(conn, s)
        register_table(conn, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    assert refresh_table("sqp")["status"] == "success"

    # The reload's publish waits 2.5 s for a lock a dashboard holds: longer than the role's 1 s statement timeout
    # (waiting counts), well within the refresh's own lock and statement timeouts.
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(400, updated=T0.replace(day=6)))
    waits: list[bool] = []
    with psycopg.connect(role_uri) as reader:
        reader.execute(f'LOCK TABLE "{s}".sqp IN SHARE MODE')
        release = threading.Thread(target=release_when_waited_on, args=(reader, role_uri, waits), daemon=True)
        release.start()
        try:
            run = refresh_table("sqp")
        finally:
            release.join()
    assert run["status"] == "success" and run["rows_updated"] == 400, run
    assert waits == [True]  # the publish did wait on the lock (2.5 s past the role's 1 s timeout)
    with psycopg.connect(role_uri) as conn:
        assert_same_rows(source_rows(source, "sqp"), pg_rows(conn, f'"{s}".sqp', "1, 2, 3"), SQP_KEY)


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_with_the_statement_timeout_set_short_the_same_wait_fails_cleanly_and_the_table_is_untouched(
    env: Settings, role_uri: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check above can fail: with REFRESH_STATEMENT_TIMEOUT_SECONDS=1 the same wait ends the publish."""
    monkeypatch.setenv("BQ_REFRESH_DATABASE_URL", role_uri)
    monkeypatch.setenv("REFRESH_RETRIES", "0")
    s = env.schema_name
    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(400))
    with psycopg.connect(role_uri, autocommit=True) as conn:
        apply_migrations(conn, s)
        register_table(conn, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    assert refresh_table("sqp")["status"] == "success"
    with psycopg.connect(role_uri) as conn:
        before = pg_rows(conn, f'"{s}".sqp', "1, 2, 3")
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(400, updated=T0.replace(day=6)))
    monkeypatch.setenv("REFRESH_STATEMENT_TIMEOUT_SECONDS", "1")
    waits: list[bool] = []
    with psycopg.connect(role_uri) as reader:
        reader.execute(f'LOCK TABLE "{s}".sqp IN SHARE MODE')
        release = threading.Thread(target=release_when_waited_on, args=(reader, role_uri, waits), daemon=True)
        release.start()
        try:
            with pytest.raises(Exception, match="statement timeout"):
                refresh_table("sqp")
        finally:
            release.join()
    with psycopg.connect(role_uri) as conn:
        assert_same_rows(before, pg_rows(conn, f'"{s}".sqp', "1, 2, 3"), SQP_KEY, ignore=())
