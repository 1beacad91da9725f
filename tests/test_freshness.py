"""Staleness visible: refresh_freshness (readable by a dashboard role, nothing else), status and /health show each
table's age against its frequency; the daily run alerts `stale` once per episode and `recovered` when fresh again.
The clock is the audit rows' times, set by SQL."""

from __future__ import annotations

import json
import uuid
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
from flows.daily_refresh import daily_refresh
from tasks.freshness import episode_changes, is_stale
from tasks.migrations import apply_migrations
from tasks.registry import register_table
from tests.bqdata import bq_schema, put_table
from tests.conftest import WebhookReceiver
from tests.test_webhook_contract import validator

SCHEMA = bq_schema([("id", "INT64"), ("v", "INT64"), ("updated_at", "TIMESTAMP")])


@pytest.mark.parametrize("stale, open_episodes, expected", [
    ({"a": False}, set(), ([], [])),
    ({"a": True}, set(), (["a"], [])),  # an episode starts: one alert
    ({"a": True}, {"a"}, ([], [])),  # still stale: nothing more
    ({"a": False}, {"a"}, ([], ["a"])),  # fresh again: recovered
    ({"a": True, "b": False}, {"b", "gone"}, (["a"], ["b"])),  # a table no longer watched closes silently
])
def test_episode_changes(stale: dict[str, bool], open_episodes: set[str],
                         expected: tuple[list[str], list[str]]) -> None:
    assert episode_changes(stale, open_episodes) == expected


def test_is_stale_is_frequency_plus_grace() -> None:
    assert not is_stale(True, 25.9, 24, 2) and is_stale(True, 26.1, 24, 2) and not is_stale(False, 99, 24, 2)


def rows(at: datetime) -> pa.Table:
    return pa.table({"id": pa.array(range(1, 6), pa.int64()), "v": pa.array([1] * 5, pa.int64()),
                     "updated_at": pa.array([at] * 5, pa.timestamp("us", tz="UTC"))})


def events(webhook: WebhookReceiver) -> list[dict[str, Any]]:
    return [json.loads(r["body"]) for r in webhook.received]


@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.usefixtures("prefect_harness")
def test_fresh_stale_still_stale_recovered(env: Settings, pg: psycopg.Connection[Any], webhook: WebhookReceiver,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("REFRESH_RETRIES", "0")
    s = env.schema_name
    apply_migrations(pg, s)
    source = BigQuerySource.from_settings(env)
    put_table(source, "t", SCHEMA, rows(datetime.now(UTC) - timedelta(hours=1)))
    register_table(pg, s, "t", {"source": "t", "key": ["id"], "cursor": "updated_at"}, frequency_hours=24)
    register_table(pg, s, "new_one", {"source": "nothing_yet", "key": ["id"], "cursor": "updated_at"},
                   enabled=False)
    api = TestClient(create_app(load_settings()))

    # Night 1: fresh. data_as_of is the read session's snapshot, recorded in the audit row.
    assert daily_refresh(return_state=True).is_completed()
    as_of = pg.execute(f'SELECT (sync_metadata->>\'data_as_of\')::timestamptz, refresh_completed_at'
                       f' FROM "{s}".refresh_audit_log WHERE status = \'success\'').fetchone()
    assert as_of is not None and as_of[0] is not None and as_of[0] <= as_of[1]
    fresh = pg.execute(f'SELECT data_as_of, is_stale, rows_read_last_success, age_hours < 1, stale_after_hours'
                       f' FROM "{s}".refresh_freshness WHERE table_name = \'t\'').fetchone()
    assert fresh == (as_of[0], False, 5, True, 26)
    assert [e["event"] for e in events(webhook)] == []

    # The clock moves 30 h on; the table is not due tonight (e.g. its night's run was missed): stale, one alert.
    def age_the_table(hours: float) -> None:
        pg.execute(f'UPDATE "{s}".refresh_audit_log SET refresh_completed_at = now() - %s * interval \'1 hour\','
                   " sync_metadata = sync_metadata || jsonb_build_object('data_as_of', now() - %s * interval '1 hour')"
                   " WHERE table_name = 't'", (hours, hours + 0.1))
        pg.execute(f'UPDATE "{s}".refresh_config SET next_refresh_at = now() + interval \'1 day\' WHERE table_name = \'t\'')

    age_the_table(30)
    state = daily_refresh(return_state=True)
    assert state.is_completed() and state.result()["tables"] == [] and state.result()["stale"] == [f"{s}.t"]
    (stale,) = events(webhook)
    assert (stale["event"], stale["type"], stale["table_name"], stale["details"]["frequency_hours"]) == (
        "stale", "stale_data", "t", 24)
    assert 30 < stale["details"]["age_hours"] < 31 and "30.1 h old" in stale["error_message"]
    assert not list(validator().iter_errors(stale))
    health = api.get("/health")
    assert health.status_code == 503
    assert [(p["table"], p["reason"].split(":")[0]) for p in health.json()["problems"]] == [(f"{s}.t", "stale")]
    out = CliRunner().invoke(cli_app, ["status", "--json"])
    assert out.exit_code == 0, out.output
    row = next(r for r in json.loads(out.output) if r["table"] == f"{s}.t")
    assert row["stale"] is True and row["healthy"] is False and 30 < row["age_hours"] < 31
    assert pg.execute(f'SELECT is_stale FROM "{s}".refresh_freshness WHERE table_name = \'t\'').fetchone() == (True,)

    # The next run: still stale, no second alert.
    age_the_table(54)
    assert daily_refresh(return_state=True).is_completed()
    assert [e["event"] for e in events(webhook)] == ["stale"]

    # Refreshed: fresh again, recovered (once).
    assert daily_refresh(force=True, return_state=True).is_completed()
    assert [e["event"] for e in events(webhook)] == ["stale", "recovered"]
    recovered = events(webhook)[1]
    assert recovered["table_name"] == "t" and recovered["details"]["from"] == "stale"
    assert api.get("/health").status_code == 200
    assert daily_refresh(return_state=True).is_completed()
    assert [e["event"] for e in events(webhook)] == ["stale", "recovered"]


def test_a_dashboard_role_reads_freshness_and_nothing_else(settings: Settings, pg: psycopg.Connection[Any]) -> None:
    s = settings.schema_name
    apply_migrations(pg, s)
    apply_migrations(pg, s)  # idempotent
    register_table(pg, s, "t", {"source": "t", "key": ["id"], "cursor": "updated_at"})
    role = f"dash_{uuid.uuid4().hex[:8]}"
    pg.execute(f'CREATE ROLE "{role}" NOLOGIN')
    pg.execute(f'GRANT "{role}" TO CURRENT_USER')  # SET ROLE without superuser (Supabase's postgres) needs it
    try:
        pg.execute(f'GRANT USAGE ON SCHEMA "{s}" TO "{role}"')
        pg.execute(f'GRANT SELECT ON "{s}".refresh_freshness TO "{role}"')
        with pg.transaction():
            pg.execute(f'SET LOCAL ROLE "{role}"')
            row = pg.execute(f'SELECT table_name, data_as_of, is_stale FROM "{s}".refresh_freshness').fetchone()
            assert row == ("t", None, False)  # registered just now, never refreshed: aged from its registration
        with pytest.raises(psycopg.errors.InsufficientPrivilege), pg.transaction():
            pg.execute(f'SET LOCAL ROLE "{role}"')
            pg.execute(f'SELECT * FROM "{s}".refresh_audit_log')
    finally:
        pg.execute(f'DROP OWNED BY "{role}"')
        pg.execute(f'DROP ROLE "{role}"')
