"""Views are part of the night: a dependent materialized view that fails its refresh, or a view that no longer
answers its probe, alerts view_refresh_failed, marks the table's run (warning, or failed by setting) and shows in
/health, `bq-refresh status` and the run's summary; the next good night clears it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from blocks import BigQuerySource
from bq_refresh.settings import Settings, load_settings
from flows.api import create_app
from flows.cli import app as cli_app
from flows.daily_refresh import daily_refresh, night_summary
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import bq_schema, put_table
from tests.conftest import WebhookReceiver
from tests.test_webhook_contract import validator

pytestmark = [pytest.mark.emulator, pytest.mark.once, pytest.mark.usefixtures("prefect_harness")]
SCHEMA = bq_schema([("id", "INT64"), ("v", "INT64"), ("updated_at", "TIMESTAMP")])


def rows(v: int, at: datetime) -> pa.Table:
    return pa.table({"id": pa.array(range(1, 6), pa.int64()), "v": pa.array([v] * 5, pa.int64()),
                     "updated_at": pa.array([at] * 5, pa.timestamp("us", tz="UTC"))})


def view_alerts(webhook: WebhookReceiver) -> list[dict[str, Any]]:
    return [b for b in (json.loads(r["body"]) for r in webhook.received) if b["event"] == "view_refresh_failed"]


def test_a_failed_view_alerts_marks_the_run_and_shows_in_health_and_status(
    env: Settings, pg: psycopg.Connection[Any], webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("REFRESH_RETRIES", "0")
    s = env.schema_name
    apply_migrations(pg, s)
    source = BigQuerySource.from_settings(env)
    t0 = datetime.now(UTC) - timedelta(hours=3)
    put_table(source, "t", SCHEMA, rows(4, t0))
    register_table(pg, s, "t", {"source": "t", "key": ["id"], "cursor": "updated_at"})
    assert daily_refresh(return_state=True).is_completed()
    # What dashboards read: a materialized view that divides by v (refreshed CONCURRENTLY: it has a unique
    # index), and a plain view over a function that raises on a v of 0.
    pg.execute(f'CREATE MATERIALIZED VIEW "{s}".per_unit AS SELECT id, 100 / v AS share FROM "{s}".t')
    pg.execute(f'CREATE UNIQUE INDEX ON "{s}".per_unit (id)')
    pg.execute(f'CREATE FUNCTION "{s}".checked(v bigint) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN'
               " IF v = 0 THEN RAISE EXCEPTION 'v must not be 0'; END IF; RETURN true; END $$")
    pg.execute(f'CREATE VIEW "{s}".checked_rows AS SELECT id, v FROM "{s}".t WHERE "{s}".checked(v)')
    api = TestClient(create_app(load_settings()))
    assert api.get("/health").status_code == 200

    # Night 2: the new data makes v 0 everywhere; the data is published, both views break.
    put_table(source, "t", SCHEMA, rows(0, t0 + timedelta(hours=1)))
    state = daily_refresh(force=True, return_state=True)
    assert state.is_completed()  # warning (the default): the run goes on and completes
    summary = state.result()
    run = summary["tables"][0]
    assert run["status"] == "warning" and run["rows_updated"] == 5
    assert {v["view"] for v in run["views_failed"]} == {f"{s}.per_unit", f"{s}.checked_rows"}
    alerts = view_alerts(webhook)
    assert sorted(a["details"]["view"] for a in alerts) == [f"{s}.checked_rows", f"{s}.per_unit"]
    check = validator()
    for a in alerts:
        assert not list(check.iter_errors(a)), a
        assert (a["table_name"], a["audit_log_id"], a["type"], a["status"]) == ("t", run["audit_id"], "view_failure",
                                                                                "warning")
    by_view = {a["details"]["view"]: a for a in alerts}
    assert "division by zero" in by_view[f"{s}.per_unit"]["error_message"]
    assert by_view[f"{s}.per_unit"]["details"]["refreshed"] is False
    assert "v must not be 0" in by_view[f"{s}.checked_rows"]["error_message"]
    audit = pg.execute(f'SELECT status, sync_metadata->\'views_failed\' FROM "{s}".refresh_audit_log'
                       " WHERE id = %s", (run["audit_id"],)).fetchone()
    assert audit is not None and audit[0] == "warning" and len(audit[1]) == 2
    health = api.get("/health")
    assert health.status_code == 503
    (problem,) = health.json()["problems"]
    assert problem["table"] == f"{s}.t" and "per_unit" in problem["reason"] and "checked_rows" in problem["reason"]
    out = CliRunner().invoke(cli_app, ["status", "--json"])
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.output)
    assert row["healthy"] is False and {v["view"] for v in row["views_failed"]} == {f"{s}.per_unit", f"{s}.checked_rows"}

    # Night 3, with failures set to fail the run: nothing changed in the data, yet the materialized view whose
    # last refresh failed is refreshed again (and fails again); the run fails.
    monkeypatch.setenv("REFRESH_VIEW_FAILURE_STATUS", "failed")
    state = daily_refresh(force=True, return_state=True)
    assert state.is_failed()
    run = night_summary(state)["tables"][0]
    assert run["status"] == "failed" and run["rows_updated"] == 0
    assert next(v for v in run["views_failed"] if v["view"] == f"{s}.per_unit")["refreshed"] is False
    assert [a["status"] for a in view_alerts(webhook)][2:] == ["failed", "failed"]
    # The view alerts are the failed table's report: no table_failed or run_failed repeats it.
    assert not {b["event"] for b in map(json.loads, (r["body"] for r in webhook.received))} & {"run_failed", "table_failed"}

    # Night 4: good data again: views refreshed, healthy.
    put_table(source, "t", SCHEMA, rows(5, t0 + timedelta(hours=2)))
    assert daily_refresh(force=True, return_state=True).is_completed()
    assert api.get("/health").status_code == 200
    assert pg.execute(f'SELECT max(share) FROM "{s}".per_unit').fetchone() == (20,)
    assert len(view_alerts(webhook)) == 4
