"""What a dashboard sees under row-level security, before, during and after a publish.

A dashboard role sees a subset of the live table through a policy, by a ``security_invoker`` view (the policy
applies to the reader) and a plain view (the view owner's rights: the policy of the owner applies, as on
Supabase). A reload that re-reads everything and changes nothing leaves both views' answers identical (a
digest of their rows) before the publish, while the publish's transaction is open (the views answer at once,
with the old rows) and after it; a reload that changes rows gives, after the publish, exactly what the source
gives under the same filter, computed here from BigQuery's rows; the policy survives every publish.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from blocks import BigQuerySource
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import put_table, source_rows
from tests.conftest import ROOT
from tests.test_engine import SQP_KEY, SQP_SCHEMA, T0, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]

VISIBLE = ("B000000001", "B000000002", "B000000003")  # the ASINs the dashboard role may see
VIEW = "SELECT asin, start_date, sum(impressions) AS impressions, max(median_price) AS price FROM {t} GROUP BY 1, 2"


def digest(rows: list[tuple[Any, ...]]) -> str:
    """Order-free digest of (asin, week, impressions, price) rows; numbers by value (sum(bigint) is numeric in
    PostgreSQL, an int in Python)."""
    norm = sorted((str(a), d, int(n), Decimal(p).normalize()) for a, d, n, p in rows)
    return hashlib.sha256(repr(norm).encode()).hexdigest()


@pytest.fixture
def dashboard(pg: psycopg.Connection[Any]) -> Iterator[str]:
    role = f"dash_{uuid.uuid4().hex[:8]}"
    try:
        pg.execute(f"CREATE ROLE {role} NOLOGIN")
    except psycopg.errors.InsufficientPrivilege as exc:
        pytest.skip(f"the test's role may not create roles: {exc}")
    pg.execute(f"GRANT {role} TO current_user")  # SET ROLE needs membership (not a superuser on Supabase)
    try:
        yield role
    finally:
        pg.execute(f"DROP OWNED BY {role} CASCADE")
        pg.execute(f"DROP ROLE {role}")


def as_role(uri: str, role: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(f"SET ROLE {role}")
        conn.execute("SET statement_timeout = '5s'")  # a view blocked by the publish fails instead of waiting
        return [tuple(r) for r in conn.execute(query).fetchall()]


def expected(source: BigQuerySource, only: tuple[str, ...] | None) -> list[tuple[Any, ...]]:
    """The views' answer computed from BigQuery's rows, in Python."""
    groups: dict[tuple[Any, Any], list[Any]] = {}
    for r in source_rows(source, "sqp"):
        if only is None or r["asin"] in only:
            g = groups.setdefault((r["asin"], r["start_date"]), [0, None])
            g[0] += r["impressions"]
            g[1] = r["median_price"] if g[1] is None else max(g[1], r["median_price"])
    return [(a, d, total, price) for (a, d), (total, price) in groups.items()]


def test_a_dashboard_under_row_level_security_sees_the_same_rows_before_during_and_after_a_publish(
    env: Settings, pg: psycopg.Connection[Any], pg_uri: str, source: BigQuerySource, dashboard: str,
) -> None:
    s = env.schema_name
    apply_migrations(pg, s)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(2000))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    assert refresh_table("sqp")["status"] == "success"
    live = f'"{s}".sqp'
    pg.execute(f"ALTER TABLE {live} ENABLE ROW LEVEL SECURITY")
    pg.execute(f"CREATE POLICY dashboard_asins ON {live} FOR SELECT TO {dashboard} USING (asin IN {VISIBLE!r})")
    pg.execute(f'CREATE VIEW "{s}".by_asin_invoker WITH (security_invoker = true) AS {VIEW.format(t=live)}')
    pg.execute(f'CREATE VIEW "{s}".by_asin AS {VIEW.format(t=live)}')
    pg.execute(f'GRANT USAGE ON SCHEMA "{s}" TO {dashboard}')
    pg.execute(f'GRANT SELECT ON {live}, "{s}".by_asin_invoker, "{s}".by_asin TO {dashboard}')
    invoker = f'SELECT * FROM "{s}".by_asin_invoker'
    owner = f'SELECT * FROM "{s}".by_asin'
    before = {q: digest(as_role(pg_uri, dashboard, q)) for q in (invoker, owner)}
    assert digest(as_role(pg_uri, dashboard, invoker)) == digest(expected(source, VISIBLE))
    assert len(as_role(pg_uri, dashboard, invoker)) == 2 * len(VISIBLE)  # the policy applies to the reader

    # A full reload that changes nothing, caught inside its publish (the merge waits on a lock held here).
    blocker = psycopg.connect(pg_uri)
    blocker.execute(f"LOCK TABLE {live} IN SHARE MODE")
    from prefect.settings import PREFECT_API_URL

    child = subprocess.Popen([sys.executable, "-c", "import sys; from flows.refresh_table import refresh_table;"
                              " sys.exit(0 if refresh_table('sqp', full_refresh=True)['status'] == 'success' else 1)"],
                             cwd=ROOT, env={**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
                                            "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not pg.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                             " AND query ILIKE 'WITH %up AS (INSERT%'").fetchone():
            assert child.poll() is None, child.stderr.read().decode()[-2000:] if child.stderr else ""
            assert time.monotonic() < deadline, "the publish never started"
            time.sleep(0.05)
        during = {q: digest(as_role(pg_uri, dashboard, q)) for q in (invoker, owner)}
    finally:
        blocker.close()
        rc = child.wait(timeout=120)
    assert rc == 0
    after = {q: digest(as_role(pg_uri, dashboard, q)) for q in (invoker, owner)}
    assert before == during == after

    # A reload that changes every row: after the publish, the source's answer under the same filter.
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(2000, updated=T0.replace(day=9), price_bump=1))
    assert refresh_table("sqp")["rows_updated"] == 2000
    assert digest(as_role(pg_uri, dashboard, invoker)) == digest(expected(source, VISIBLE))
    policies = pg.execute("SELECT policyname FROM pg_policies WHERE schemaname = %s AND tablename = 'sqp'",
                          (s,)).fetchall()
    assert ("dashboard_asins",) in policies
    owner_rows = as_role(pg_uri, dashboard, owner)
    assert owner_rows and digest(owner_rows) != before[owner]  # the owner's view shows the new prices too
