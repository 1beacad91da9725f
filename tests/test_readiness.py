"""Source readiness: a table waits for its source (a marker table, the source's modification in BigQuery's table
metadata), re-checking at its interval up to its deadline; a source that never gets ready skips the table with
source_stale and the night goes on; without a condition, a read of nothing from an old source alerts once."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from google.cloud import bigquery

from blocks import BigQuerySource
from bq_refresh.settings import Settings
from flows.daily_refresh import daily_refresh
from tasks.migrations import apply_migrations
from tasks.readiness import SourceState, decide, marker_name, wait_until_ready
from tasks.registry import register_table
from tasks.spec import Readiness
from tests.bqdata import bq_schema, put_table
from tests.conftest import WebhookReceiver
from tests.test_webhook_contract import validator

SCHEMA = bq_schema([("id", "INT64"), ("v", "INT64"), ("updated_at", "TIMESTAMP")])
LAST = datetime(2026, 1, 10, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize("condition, state, waited_min, verdict", [
    (Readiness(marker_table="d.m"), SourceState(None, True), 0, "ready"),
    (Readiness(marker_table="d.m", wait_minutes=60), SourceState(None, False), 59, "wait"),
    (Readiness(marker_table="d.m", wait_minutes=60), SourceState(None, False), 60, "not_ready"),
    (Readiness(modified_since_last_read=True), SourceState(LAST + timedelta(hours=1), None), 0, "ready"),
    (Readiness(modified_since_last_read=True), SourceState(LAST, None), 0, "wait"),
    (Readiness(modified_since_last_read=True, wait_minutes=0), SourceState(LAST, None), 0, "not_ready"),
    (Readiness(modified_since_last_read=True, marker_table="d.m"), SourceState(LAST + timedelta(hours=1), False), 0,
     "wait"),
])
def test_decide(condition: Readiness, state: SourceState, waited_min: float, verdict: str) -> None:
    assert decide(condition, state, last_read=LAST, waited=timedelta(minutes=waited_min)).verdict == verdict


def test_a_condition_is_required_and_the_marker_is_dated() -> None:
    with pytest.raises(ValueError):
        Readiness()
    assert marker_name("ops.loaded_{date}", datetime(2026, 3, 4, 23, 0, tzinfo=UTC)) == "ops.loaded_20260304"


def test_waiting_rechecks_at_the_interval_up_to_the_deadline() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    outcome = wait_until_ready(Readiness(marker_table="d.m", wait_minutes=60, check_every_minutes=15),
                               lambda: SourceState(None, False), last_read=None, sleep=sleep, clock=lambda: now[0])
    assert (outcome.ready, outcome.checks, slept) == (False, 5, [900.0] * 4)
    states = iter([False, False, True])
    outcome = wait_until_ready(Readiness(marker_table="d.m", check_every_minutes=15),
                               lambda: SourceState(None, next(states)), last_read=None, sleep=sleep,
                               clock=lambda: now[0])
    assert (outcome.ready, outcome.checks) == (True, 3)


def rows(n: int, at: datetime) -> pa.Table:
    return pa.table({"id": pa.array(range(1, n + 1), pa.int64()), "v": pa.array([1] * n, pa.int64()),
                     "updated_at": pa.array([at] * n, pa.timestamp("us", tz="UTC"))})


@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.usefixtures("prefect_harness")
def test_ready_during_the_window_never_ready_and_an_empty_read(
    env: Settings, pg: psycopg.Connection[Any], webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("REFRESH_RETRIES", "0")
    monkeypatch.setenv("REFRESH_SOURCE_STALE_HOURS", "0.0003")  # ~1 s: the emulator's tables are seconds old
    s = env.schema_name
    apply_migrations(pg, s)
    source = BigQuerySource.from_settings(env)
    client = source.get_bigquery_client()
    at = datetime.now(UTC) - timedelta(hours=1)
    for name in ("late", "never", "plain", "modified"):
        put_table(source, name, SCHEMA, rows(5, at))
    put_table(source, "empty", SCHEMA, rows(0, at))
    spec = {"key": ["id"], "cursor": "updated_at"}
    fast = {"wait_minutes": 0.2, "check_every_minutes": 0.01}  # 12 s at most, re-checked every 0.6 s
    register_table(pg, s, "late", {**spec, "source": "late", "readiness": {"marker_table": "late_done_{date}", **fast}})
    register_table(pg, s, "never", {**spec, "source": "never",
                                    "readiness": {"marker_table": "never_done_{date}", "wait_minutes": 0.05,
                                                  "check_every_minutes": 0.01}})
    register_table(pg, s, "modified", {**spec, "source": "modified", "readiness": {
        "modified_since_last_read": True, "wait_minutes": 0.05, "check_every_minutes": 0.01}})
    register_table(pg, s, "plain", {**spec, "source": "plain"})
    register_table(pg, s, "empty", {**spec, "source": "empty"})

    marker = source.table_ref(marker_name("late_done_{date}", datetime.now(UTC)))
    loader = threading.Timer(2.0, lambda: client.create_table(bigquery.Table(marker, schema=SCHEMA)))
    loader.start()
    time.sleep(1.1)  # the empty source is older than REFRESH_SOURCE_STALE_HOURS
    state = daily_refresh(return_state=True)
    loader.join()
    assert state.is_completed()
    by_table = {r["table"].split(".")[1]: r for r in state.result()["tables"]}
    assert {t: r["status"] for t, r in by_table.items()} == {
        "late": "success", "never": "skipped", "modified": "success", "plain": "success", "empty": "success"}
    assert by_table["late"]["rows_read"] == 5
    never = by_table["never"]
    assert never["reason"].startswith("source not ready") and never["readiness_checks"] >= 3
    audit = pg.execute(f'SELECT status, sync_metadata->>\'reason\' FROM "{s}".refresh_audit_log WHERE id = %s',
                       (never["audit_id"],)).fetchone()
    assert audit == ("skipped", "source not ready")
    bodies = [json.loads(r["body"]) for r in webhook.received]
    stale = sorted((b["table_name"], b["status"]) for b in bodies if b["event"] == "source_stale")
    assert stale == [("empty", "success"), ("never", "skipped")], bodies
    never_alert = next(b for b in bodies if b["table_name"] == "never")
    assert "never_done_" in never_alert["error_message"] and never_alert["audit_log_id"] == never["audit_id"]
    assert never_alert["details"]["source_modified"] == client.get_table(source.table_ref("never")).modified.isoformat()
    for b in bodies:
        assert not list(validator().iter_errors(b)), b

    # Night 2: "modified" was not modified since its last read: skipped; once its source is loaded again (the
    # emulator's lastModifiedTime moves when the table is re-created) it refreshes. The empty source alerts no more.
    state = daily_refresh(tables=["modified", "empty"], return_state=True)
    by_table = {r["table"].split(".")[1]: r for r in state.result()["tables"]}
    assert by_table["modified"]["status"] == "skipped" and "not modified since" in by_table["modified"]["reason"]
    put_table(source, "modified", SCHEMA, rows(6, at))
    state = daily_refresh(tables=["modified"], return_state=True)
    assert state.result()["tables"][0]["status"] == "success" and state.result()["tables"][0]["rows_read"] >= 1
    events = [(b["event"], b["table_name"]) for b in map(json.loads, (r["body"] for r in webhook.received))]
    assert events.count(("source_stale", "empty")) == 1 and events.count(("source_stale", "modified")) == 1
