"""The nightly parent flow under Prefect: waves, failures isolated, dependents skipped, retries, alerts."""

from __future__ import annotations

import json
from typing import Any

import polars as pl
import psycopg
import pyarrow as pa
import pytest

from blocks import BigQuerySource
from bq_refresh.errors import SourceUnavailable
from bq_refresh.services import free_port
from bq_refresh.settings import Settings
from flows.daily_refresh import daily_refresh, night_summary
from flows.refresh_table import refresh_table
from tasks.alerts import SIGNATURE_HEADER, verify
from tasks.registry import add_dependency, register_table
from tasks.transform import register_transform
from tests.bqdata import force_dependency, put_table
from tests.conftest import WebhookReceiver
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

# Prefect behaviour, over the same SQL paths test_engine runs on every PostgreSQL: first pass only.
pytestmark = [pytest.mark.emulator, pytest.mark.once, pytest.mark.usefixtures("prefect_harness")]
SECRET = "test-webhook-secret-7f3a"
FLAKY = {"left": 0}


@register_transform("flaky_for_tests")
def _flaky(frame: pl.LazyFrame) -> pl.LazyFrame:
    if FLAKY["left"] > 0:
        FLAKY["left"] -= 1
        raise SourceUnavailable("injected: BigQuery answered 503", table="test")
    return frame


def summary_of(state: Any) -> dict[str, Any]:
    """The parent flow's summary, whether it ended Completed or Failed."""
    data = night_summary(state)
    assert isinstance(data, dict), data
    return data


@pytest.fixture
def alerting(env: Settings, webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> WebhookReceiver:
    down = f"http://127.0.0.1:{free_port()}/nobody-listens"
    monkeypatch.setenv("REFRESH_WEBHOOK_URL", f"{webhook.url},{down}")
    monkeypatch.setenv("REFRESH_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("REFRESH_WEBHOOK_ATTEMPTS", "2")
    monkeypatch.setenv("REFRESH_WEBHOOK_TIMEOUT_SECONDS", "1")
    monkeypatch.setenv("REFRESH_RETRY_DELAY_SECONDS", "0.1")
    return webhook


def test_one_failure_is_isolated_and_its_hard_dependents_are_skipped(
    env: Settings, registry: str, pg: psycopg.Connection[Any], alerting: WebhookReceiver
) -> None:
    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(40))
    spec = {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"}
    register_table(pg, registry, "base", spec, priority=100)
    register_table(pg, registry, "summary", spec, priority=80)
    register_table(pg, registry, "broken", {**spec, "source": "missing_table"}, priority=90)
    register_table(pg, registry, "after_broken_hard", spec, priority=50)
    register_table(pg, registry, "after_broken_soft", spec, priority=50)
    register_table(pg, registry, "disabled", spec, enabled=False)
    add_dependency(pg, registry, "base", "summary")
    add_dependency(pg, registry, "broken", "after_broken_hard", "hard")
    add_dependency(pg, registry, "broken", "after_broken_soft", "soft")

    state = daily_refresh(return_state=True)
    assert state.is_failed()
    summary = {r["table"].split(".")[1]: r for r in summary_of(state)["tables"]}
    assert {k: v["status"] for k, v in summary.items()} == {
        "base": "success", "broken": "failed", "summary": "success",
        "after_broken_hard": "skipped", "after_broken_soft": "success",
    }
    assert "missing_table" in summary["broken"]["error"]
    assert "hard dependency" in summary["after_broken_hard"]["reason"]
    assert summary_of(state)["waves"][0] == [f"{registry}.base", f"{registry}.broken"]
    audit = dict(pg.execute(f'SELECT table_name, status FROM "{registry}".refresh_audit_log').fetchall())
    assert audit["after_broken_hard"] == "skipped" and audit["broken"] == "failed" and "disabled" not in audit

    # Alerts: table_failed for "broken", signed, once (the parent's run_failed does not repeat a failure its
    # table's run reported); the dead URL recorded.
    assert sorted(alerting.events()) == ["table_failed"]
    for request in alerting.received:
        assert verify(request["body"], SECRET, request["headers"][SIGNATURE_HEADER])
    failed = next(json.loads(r["body"]) for r in alerting.received if json.loads(r["body"])["event"] == "table_failed")
    assert failed["table"] == "broken" or failed["table"].endswith(".broken") or failed["table"] == f"{registry}.broken"
    assert failed["flow_run_id"] and "missing_table" in failed["error"]
    undelivered = pg.execute(
        f'SELECT count(*), min(attempts) FROM "{registry}".refresh_alerts WHERE status = %s', ("undelivered",)
    ).fetchone()
    assert undelivered == (1, 2)
    assert SECRET not in json.dumps(alerting.received[0]["body"].decode())


def test_nothing_due_is_not_refreshed_unless_forced(env: Settings, registry: str, pg: psycopg.Connection[Any]) -> None:
    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(10))
    register_table(pg, registry, "t", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    assert summary_of(daily_refresh(return_state=True))["tables"][0]["rows_inserted"] == 10
    assert summary_of(daily_refresh(return_state=True))["tables"] == []
    forced = summary_of(daily_refresh(force=True, return_state=True))["tables"]
    assert [r["rows_inserted"] for r in forced] == [0]


def test_a_transient_error_is_retried_and_recovers(env: Settings, registry: str, pg: psycopg.Connection[Any],
                                                   alerting: WebhookReceiver) -> None:
    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(30))
    register_table(pg, registry, "t", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at",
                                       "transform": "flaky_for_tests"})
    FLAKY["left"] = 2
    result = refresh_table("t")
    assert result["status"] == "success" and result["rows_inserted"] == 30 and FLAKY["left"] == 0


def test_a_permanent_error_is_not_retried_and_recovery_is_alerted(
    env: Settings, registry: str, pg: psycopg.Connection[Any], alerting: WebhookReceiver
) -> None:
    source = BigQuerySource.from_settings(env)
    register_table(pg, registry, "t", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    with pytest.raises(Exception, match="not found"):
        refresh_table("t")
    assert alerting.events() == ["table_failed"]
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(5))
    assert refresh_table("t")["status"] == "success"
    assert alerting.events() == ["table_failed", "recovered"]
    audit = pg.execute(f'SELECT status, error_details->>\'type\' FROM "{registry}".refresh_audit_log ORDER BY id').fetchall()
    assert audit == [("failed", "SourceError"), ("success", None)]


def test_a_dependency_cycle_fails_the_run_naming_it(env: Settings, registry: str, pg: psycopg.Connection[Any]) -> None:
    spec = {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"}
    register_table(pg, registry, "a", spec)
    register_table(pg, registry, "b", spec)
    add_dependency(pg, registry, "a", "b")
    force_dependency(pg, registry, "b", "a")
    state = daily_refresh(return_state=True)
    assert state.is_failed() and "dependency cycle" in str(state.message) + str(night_summary(state))


def test_a_timed_out_table_resumes_from_its_checkpoint(env: Settings, registry: str, pg: psycopg.Connection[Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.killable_refresh  # noqa: F401  (registers the slow transform)

    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(8000))
    register_table(pg, registry, "t", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at", "batch_size": 200,
                                       "transform": "slow_for_tests", "direct_initial_load": False})
    monkeypatch.setenv("REFRESH_TABLE_TIMEOUT_SECONDS", "3")  # staging 40 batches x 0.15 s takes ~6 s
    first = summary_of(daily_refresh(tables=["t"], return_state=True))
    assert first["failed"] == [f"{registry}.t"]
    assert "timed out" in first["tables"][0]["error"].lower() or "timeout" in first["tables"][0]["error"].lower()
    staged = pg.execute(f'SELECT last_processed_row FROM "{registry}".refresh_checkpoints WHERE status = %s',
                        ("active",)).fetchone()
    assert staged is not None and 0 < staged[0] < 8000
    assert pg.execute(f'SELECT count(*) FROM "{registry}".t').fetchone() == (0,)

    monkeypatch.setenv("REFRESH_TABLE_TIMEOUT_SECONDS", "600")
    second = summary_of(daily_refresh(tables=["t"], return_state=True))["tables"][0]
    assert second["status"] == "success" and second["resumed"] is True
    assert second["rows_read"] == 8000 - staged[0] and second["rows_inserted"] == 8000
    statuses = [r[0] for r in pg.execute(f'SELECT status FROM "{registry}".refresh_audit_log ORDER BY id')]
    assert statuses == ["failed", "success"]


def test_slow_runs_drift_and_notification_blocks_alert(
    env: Settings, registry: str, pg: psycopg.Connection[Any], alerting: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.artifacts import Artifact
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    CustomWebhookNotificationBlock(name="ops", url=alerting.url, json_data={"text": "{{body}}", "event": "block"},
                                   allow_private_urls=True).save(
        "bq-refresh-test-alerts", overwrite=True)
    monkeypatch.setenv("REFRESH_NOTIFICATION_BLOCK", "custom-webhook/bq-refresh-test-alerts")
    monkeypatch.setenv("REFRESH_TIMEOUT_WARNING_MS", "1")
    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(10))
    register_table(pg, registry, "t", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    summary = summary_of(daily_refresh(tables=["t"], return_state=True))
    assert summary["tables"][0]["status"] == "warning" and summary["tables"][0]["slow"] is True
    deliveries = pg.execute(f'SELECT channel, status, last_error FROM "{registry}".refresh_alerts').fetchall()
    assert alerting.events() == ["timeout_warning", "block"], deliveries  # the webhook, then the block

    alerting.received.clear()
    from tests.bqdata import bq_schema

    data = sqp_rows(10).append_column("currency", pa.array(["USD"] * 10))
    put_table(source, "sqp", [*SQP_SCHEMA, *bq_schema([("currency", "STRING")])], data)
    refresh_table("t")
    assert "schema_drift" in alerting.events()
    drift = next(json.loads(r["body"]) for r in alerting.received if json.loads(r["body"]).get("event") == "schema_drift")
    assert drift["details"]["drift"]["columns_added"] == ["currency"]
    artifact = Artifact.get("daily-refresh-summary")
    assert artifact is not None and "t" in str(artifact.data)
