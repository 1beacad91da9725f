"""A target whose row-level security applies to the refresh's own role (FORCE ROW LEVEL SECURITY on a table it
owns): rows its policies hide would be neither updated nor deleted, and every count a check makes would see only
the rows it sees, so a copy could pass its checks while rows are stale. Such a table is refused at registration
and at the run (before anything is written: audited, alerted, live rows as they were) with the reason and the
policy to add; with a policy that gives the role every row it works, compared with BigQuery value by value.

Runs where the refresh's role is subject to row-level security (the Supabase-like pass: ``postgres`` is no
superuser); a superuser bypasses it, so the test is skipped on the embedded server.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from blocks import BigQuerySource
from bq_refresh.errors import ConfigError
from bq_refresh.settings import Settings
from flows.refresh_table import refresh_table
from tasks.registry import register_table
from tests.bqdata import assert_same_rows, create_sqp_target, pg_rows, put_table, source_rows
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.emulator, pytest.mark.usefixtures("prefect_harness")]

HIDDEN = "B000000001"  # the ASIN a narrowing policy hides from the refresh's role


@pytest.fixture
def forced(pg: psycopg.Connection[Any], registry: str) -> Iterator[str]:
    """The users' table with one night's rows, then FORCE ROW LEVEL SECURITY on it; the role's name."""
    bypass = pg.execute("SELECT rolsuper OR rolbypassrls, current_user FROM pg_roles WHERE rolname = current_user").fetchone()
    assert bypass is not None
    if bypass[0]:
        pytest.skip("the pass's role bypasses row-level security (a superuser): FORCE does not apply to it")
    create_sqp_target(pg, registry)
    yield str(bypass[1])


def load_first_night(pg: psycopg.Connection[Any], s: str, source: BigQuerySource) -> None:
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(300))
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "full"})
    assert refresh_table("sqp")["status"] == "success"
    pg.execute(f'ALTER TABLE "{s}".sqp ENABLE ROW LEVEL SECURITY')
    pg.execute(f'ALTER TABLE "{s}".sqp FORCE ROW LEVEL SECURITY')


def all_rows(pg: psycopg.Connection[Any], s: str) -> list[dict[str, Any]]:
    """Every row, FORCE lifted for the read (the owner then sees them all), put back after."""
    pg.execute(f'ALTER TABLE "{s}".sqp NO FORCE ROW LEVEL SECURITY')
    try:
        return pg_rows(pg, f'"{s}".sqp', "start_date, asin, search_query")
    finally:
        pg.execute(f'ALTER TABLE "{s}".sqp FORCE ROW LEVEL SECURITY')


def second_night() -> pa.Table:
    """BigQuery restates: the hidden ASIN's rows are gone and every other row's numbers changed."""
    rows = sqp_rows(300, price_bump=Decimal(1))
    return rows.filter(pc.not_equal(rows["asin"], HIDDEN))


def test_a_policy_that_hides_rows_from_the_refresh_is_refused_at_registration_and_at_the_run(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, forced: str,
    webhook: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = registry
    monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)
    load_first_night(pg, s, source)
    pg.execute(f'CREATE POLICY mine ON "{s}".sqp FOR ALL TO "{forced}" USING (asin <> \'{HIDDEN}\')')
    before = all_rows(pg, s)
    with pytest.raises(ConfigError, match=rf"not registered: target {s}\.sqp has FORCE ROW LEVEL SECURITY.*no"
                                          rf" policy gives {forced} every row for (SELECT, )?INSERT, UPDATE, DELETE"
                                          r".*CREATE POLICY bq_refresh_all"):
        register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "full"})

    put_table(source, "sqp", SQP_SCHEMA, second_night())
    with pytest.raises(ConfigError, match="FORCE ROW LEVEL SECURITY"):
        refresh_table("sqp")
    assert_same_rows(before, all_rows(pg, s), SQP_KEY)  # the live rows as they were
    audit = pg.execute(f'SELECT status, error_message FROM "{s}".refresh_audit_log ORDER BY id DESC LIMIT 1').fetchone()
    assert audit is not None and audit[0] == "failed" and "FORCE ROW LEVEL SECURITY" in audit[1], audit
    assert "table_failed" in webhook.events()


def test_a_restrictive_policy_on_the_refresh_is_refused_naming_it(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, forced: str,
) -> None:
    s = registry
    load_first_night(pg, s, source)
    pg.execute(f'CREATE POLICY bq_refresh_all ON "{s}".sqp FOR ALL TO "{forced}" USING (true) WITH CHECK (true)')
    pg.execute(f'CREATE POLICY recent_only ON "{s}".sqp AS RESTRICTIVE FOR ALL TO "{forced}"'
               " USING (start_date >= '2025-01-01')")
    with pytest.raises(ConfigError, match=r"restrictive policy recent_only narrow"):
        register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "full"})


def test_with_a_policy_that_gives_the_refresh_every_row_a_forced_table_is_refreshed_exactly(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, forced: str,
) -> None:
    s = registry
    load_first_night(pg, s, source)
    pg.execute(f'CREATE POLICY bq_refresh_all ON "{s}".sqp FOR ALL TO "{forced}" USING (true) WITH CHECK (true)')
    pg.execute(f'CREATE POLICY dashboards ON "{s}".sqp FOR SELECT TO PUBLIC USING (asin = \'{HIDDEN}\')')
    register_table(pg, s, "sqp", {"source": "sqp", "key": SQP_KEY, "mode": "full"})
    put_table(source, "sqp", SQP_SCHEMA, second_night())
    run = refresh_table("sqp")
    assert run["status"] == "success" and run["rows_deleted"] > 0, run
    assert_same_rows(source_rows(source, "sqp"), all_rows(pg, s), SQP_KEY)
