"""The webhook contract (docs/webhook.schema.json): a body of every alert event, delivered to a real local HTTP
server by real flow runs where the event can be caused, validates against the schema and names its audit row."""

from __future__ import annotations

import ast
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from jsonschema import Draft202012Validator, FormatChecker

from blocks import BigQuerySource
from bq_refresh.settings import Settings, load_settings
from flows.daily_refresh import daily_refresh
from tasks.alerts import (
    ALERT_TYPE_NAMES,
    ALERT_TYPES,
    EVENTS,
    SEVERITIES,
    SIGNATURE_HEADER,
    Alert,
    classify,
    send_alert,
    verify,
)
from tasks.migrations import apply_migrations
from tasks.registry import add_dependency, register_table
from tests.bqdata import bq_schema, force_dependency, put_table
from tests.conftest import ROOT, WebhookReceiver
from tests.test_engine import SQP_KEY, SQP_SCHEMA, T0, sqp_rows

SCHEMA = json.loads((ROOT / "docs" / "webhook.schema.json").read_text())
SECRET = "contract-secret-51c2"


def validator() -> Draft202012Validator:
    Draft202012Validator.check_schema(SCHEMA)
    return Draft202012Validator(SCHEMA, format_checker=FormatChecker())


def test_the_schema_names_exactly_the_events_types_and_severities_of_the_code() -> None:
    props = SCHEMA["properties"]
    assert set(props["event"]["enum"]) == EVENTS
    assert tuple(props["type"]["enum"]) == ALERT_TYPE_NAMES
    assert tuple(props["severity"]["enum"]) == SEVERITIES
    assert set(SCHEMA["required"]) == set(props) == set(Alert("table_failed", "failed").payload())


@pytest.mark.parametrize("event, status, expected", [
    ("table_failed", "failed", ("refresh_failure", "high")),
    ("table_failed", "crashed", ("refresh_failure", "high")),
    ("quality_check_failed", "failed", ("refresh_failure", "high")),
    ("schema_drift", "failed", ("refresh_failure", "high")),
    ("schema_drift", "success", ("schema_change", "warning")),
    ("run_failed", "failed", ("run_failure", "critical")),
    ("recovered", "success", ("refresh_recovered", "info")),
    ("timeout_warning", "warning", ("refresh_warning", "warning")),
    ("not_an_event_yet", "failed", ("refresh_failure", "high")),
    ("not_an_event_yet", "warning", ("refresh_warning", "warning")),
])
def test_each_event_has_a_type_and_severity(event: str, status: str, expected: tuple[str, str]) -> None:
    assert classify(event, status) == expected


def _event_literals() -> set[str]:
    """Event names the code sends: Alert("...") / Alert(event="...") and `event = "..."` in flows/ and tasks/."""
    found: set[str] = set()
    for path in [*(ROOT / "flows").glob("*.py"), *(ROOT / "tasks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Alert":
                args = [node.args[0]] if node.args else []
                args += [k.value for k in node.keywords if k.arg == "event"]
                found |= {a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
            elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "event" for t in node.targets):
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    found.add(node.value.value)
    return found


def test_every_event_the_code_sends_has_a_type() -> None:
    sent = _event_literals()
    assert {"table_failed", "run_failed", "recovered", "daily_summary"} <= sent  # the scan finds them
    assert sent <= EVENTS, f"events without a type in tasks/alerts.py ALERT_TYPES: {sorted(sent - EVENTS)}"


# --- delivered bodies ----------------------------------------------------------------------------------------

NOISY_SCHEMA = bq_schema([("id", "INT64"), ("v", "STRING"), ("updated_at", "TIMESTAMP")])


def noisy_rows() -> pa.Table:
    """Duplicate and NULL keys (rows_rejected) and a cursor a month ahead (future_cursor)."""
    now = datetime.now(UTC)
    return pa.table({
        "id": pa.array([1, 1, 2, None, 3], pa.int64()),
        "v": ["old", "new", "two", "no key", "typo"],
        "updated_at": pa.array([now - timedelta(days=1), now - timedelta(hours=1), now - timedelta(days=1),
                                now - timedelta(days=1), now + timedelta(days=30)], pa.timestamp("us", tz="UTC")),
    })


def bodies(webhook: WebhookReceiver) -> list[dict[str, Any]]:
    for request in webhook.received:
        assert verify(request["body"], SECRET, request["headers"][SIGNATURE_HEADER])
    return [json.loads(r["body"]) for r in webhook.received]


@pytest.fixture
def alerting(env: Settings, webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> WebhookReceiver:
    monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("REFRESH_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("REFRESH_RETRIES", "0")
    return webhook


@pytest.mark.emulator
@pytest.mark.once  # the alerts' shape does not depend on the PostgreSQL version
@pytest.mark.second  # run in the second pass (pyproject.toml markers)
@pytest.mark.usefixtures("prefect_harness")
def test_every_alert_event_delivered_validates_against_the_schema(
    env: Settings, pg: psycopg.Connection[Any], alerting: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = env.schema_name
    apply_migrations(pg, s)
    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(40))
    put_table(source, "noisy", NOISY_SCHEMA, noisy_rows())
    spec = {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"}
    register_table(pg, s, "noisy", {"source": "noisy", "key": ["id"], "cursor": "updated_at"})
    register_table(pg, s, "broken", {**spec, "source": "not_loaded_yet"})
    pg.execute(f'CREATE TABLE "{s}".asins (asin text PRIMARY KEY)')  # empty: every staged row is an orphan
    register_table(pg, s, "gated", {**spec, "checks": {"foreign_keys": [{"columns": ["asin"], "parent": f"{s}.asins"}]}})
    register_table(pg, s, "frozen", {**spec, "drift_policy": "freeze"})
    register_table(pg, s, "evolving", spec)
    register_table(pg, s, "cyc_a", spec)
    register_table(pg, s, "cyc_b", spec)
    add_dependency(pg, s, "cyc_a", "cyc_b")
    force_dependency(pg, s, "cyc_b", "cyc_a")

    # Night 1: rows rejected and a future cursor (noisy), a missing source (broken), a failed quality gate (gated),
    # a dependency cycle (cyc_a, cyc_b): the run fails.
    assert daily_refresh(return_state=True).is_failed()
    # Night 2: the source arrived (broken recovers), a new column (frozen stops, evolving adds it), all slow.
    put_table(source, "not_loaded_yet", SQP_SCHEMA, sqp_rows(10))
    data = sqp_rows(40, updated=T0 + timedelta(days=1)).append_column("currency", pa.array(["USD"] * 40))
    put_table(source, "sqp", [*SQP_SCHEMA, *bq_schema([("currency", "STRING")])], data)
    monkeypatch.setenv("REFRESH_TIMEOUT_WARNING_MS", "0")
    assert daily_refresh(tables=["broken", "frozen", "evolving"], return_state=True).is_failed()
    # A run that fails outside its tables (a table name not registered): run_failed.
    assert daily_refresh(tables=["not_registered"], return_state=True).is_failed()
    # Night 3: all well, with the daily summary on.
    monkeypatch.setenv("REFRESH_TIMEOUT_WARNING_MS", "600000")
    monkeypatch.setenv("REFRESH_DAILY_SUMMARY_ALERT", "true")
    assert daily_refresh(tables=["evolving"], force=True, return_state=True).is_completed()

    received = bodies(alerting)
    by_event: dict[str, list[dict[str, Any]]] = {}
    for body in received:
        by_event.setdefault(body["event"], []).append(body)
    driven = {"table_failed", "quality_check_failed", "schema_drift", "rows_rejected", "future_cursor", "run_failed",
              "recovered", "timeout_warning", "daily_summary"}
    assert set(by_event) == driven, sorted(by_event)

    # The rest cannot be caused by a flow today (flow_run_crashed: a crash the hook sees is table_failed with
    # status crashed; stale, source_stale and view_refresh_failed are issue 14's): real Alerts, really delivered.
    settings = load_settings()
    audit_id = next(int(b["audit_log_id"]) for b in received if b["audit_log_id"])
    direct = [
        Alert("flow_run_crashed", "crashed", f"{s}.evolving", "process killed (SIGKILL)", "0c0ffee0", None,
              audit_log_id=audit_id),
        Alert("stale", "warning", f"{s}.evolving", "data as of 2 days ago, frequency 24 h", None, None,
              details={"age_hours": 50}),
        Alert("source_stale", "warning", f"{s}.broken", "source not modified since 2026-01-01", None, None),
        Alert("view_refresh_failed", "warning", f"{s}.evolving", "REFRESH MATERIALIZED VIEW failed", None, None,
              details={"view": f"{s}.weekly_summary"}),
        Alert("group_held", "skipped", f"{s}.broken", "source not ready; publish group 'sqp' held", None, None,
              details={"publish_group": "sqp", "held": [f"{s}.evolving"]}),
        Alert("copy_differs", "differs", f"{s}.evolving", "1 slice(s) by start_date differ from BigQuery: 2025-01-12",
              details={"slicing": "start_date", "slices": [{"slice": "2025-01-12", "source_rows": 50,
                                                             "target_rows": 49}]}),  # tests/test_verify.py drives it
    ]
    for alert in direct:
        assert [d.delivered for d in send_alert(settings, alert, pg)] == [True]
    received = bodies(alerting)
    assert {b["event"] for b in received} == EVENTS

    check = validator()
    for body in received:
        errors = sorted(check.iter_errors(body), key=str)
        assert not errors, (body["event"], [e.message for e in errors])

    fields = {(b["event"], b["table_name"], b["type"], b["severity"], b["status"]) for b in received[:-len(direct)]}
    assert fields >= {
        ("table_failed", "broken", "refresh_failure", "high", "failed"),
        ("table_failed", "cyc_a", "refresh_failure", "high", "failed"),
        ("quality_check_failed", "gated", "refresh_failure", "high", "failed"),
        ("schema_drift", "frozen", "refresh_failure", "high", "failed"),
        ("schema_drift", "evolving", "schema_change", "warning", "warning"),  # night 2: slow, so 'warning'
        ("rows_rejected", "noisy", "refresh_warning", "warning", "warning"),
        ("future_cursor", "noisy", "refresh_warning", "warning", "warning"),
        ("recovered", "broken", "refresh_recovered", "info", "warning"),
        ("timeout_warning", "evolving", "refresh_warning", "warning", "warning"),
        ("run_failed", None, "run_failure", "critical", "failed"),
        ("daily_summary", None, "daily_summary", "info", "success"),
    }, sorted(fields, key=str)

    # Every table alert names the audit row of the run that raised it: same table, same flow run, and a
    # failure's row is failed. The guide's receiver reads table_name, error_message and audit_log_id.
    audit = {r[0]: r[1:] for r in pg.execute(
        f"SELECT id, table_schema, table_name, status, sync_metadata->>'flow_run_id' FROM \"{s}\".refresh_audit_log")}
    for body in received[:-len(direct)]:
        if body["table"] is None:
            assert body["audit_log_id"] is None
            continue
        row = audit[body["audit_log_id"]]
        assert (row[0], row[1]) == (body["table_schema"], body["table_name"]) and body["table"] == f"{s}.{row[1]}"
        assert row[3] == body["flow_run_id"], body
        assert row[2] == ("failed" if body["type"] == "refresh_failure" else body["status"]), (body, row)
        assert body["error_message"] == body["error"]
    failure = next(b for b in received if b["event"] == "quality_check_failed")
    assert "foreign_key" in failure["error_message"] and failure["severity"] == "high"
    logged = pg.execute(f'SELECT count(*) FROM "{s}".refresh_alerts WHERE payload ? \'audit_log_id\''
                        " AND payload ? 'type' AND payload ? 'severity'").fetchone()
    assert logged == (len(received),)  # the alert log keeps the same body
    assert len(ALERT_TYPES) == len(EVENTS)
