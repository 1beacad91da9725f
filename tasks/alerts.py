"""Webhook alerts: JSON signed with HMAC-SHA256, delivered with retries, every attempt recorded."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from bq_refresh.redact import redact
from bq_refresh.settings import Settings
from tasks.sqlnames import ident

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-BQ-Refresh-Signature"
SEVERITIES = ("critical", "high", "warning", "info")
FAILURE_STATUSES = frozenset({"failed", "crashed", "cancelled", "cancelling"})

# What a receiver routes on: each event's alert type and severity (docs/webhook.schema.json). The deployment guide's
# failure webhook speaks of type 'refresh_failure' with severity 'high': every event that means "this table was not
# refreshed" has that type, and `event` says why.
ALERT_TYPES: dict[str, tuple[str, str]] = {
    "table_failed": ("refresh_failure", "high"),
    "quality_check_failed": ("refresh_failure", "high"),
    "flow_run_crashed": ("refresh_failure", "critical"),
    "schema_drift": ("schema_change", "warning"),  # a drift that stopped the table: refresh_failure (below)
    "run_failed": ("run_failure", "critical"),
    "rows_rejected": ("refresh_warning", "warning"),
    "future_cursor": ("refresh_warning", "warning"),
    "timeout_warning": ("refresh_warning", "warning"),
    "recovered": ("refresh_recovered", "info"),
    "daily_summary": ("daily_summary", "info"),
    # issue 14 (freshness, source readiness, views as part of the night): typed before they are sent
    "stale": ("stale_data", "high"),
    "source_stale": ("stale_data", "warning"),
    "view_refresh_failed": ("view_failure", "high"),
    # a publish group held at its previous data by a member that was skipped (not ready, already running)
    "group_held": ("refresh_failure", "high"),
    # verify (weekly maintenance): the live table no longer equals its source in some slices
    "copy_differs": ("data_mismatch", "high"),
}
EVENTS = frozenset(ALERT_TYPES)
ALERT_TYPE_NAMES = tuple(sorted({t for t, _ in ALERT_TYPES.values()}))


def classify(event: str, status: str) -> tuple[str, str]:
    """An alert's (type, severity) from its event and status.

    A schema drift that stopped the table is a refresh failure; one that was evolved is a schema change. An
    event missing from ALERT_TYPES still gets a type the schema knows, by its status, and is logged.
    """
    if event == "schema_drift" and status in FAILURE_STATUSES:
        return "refresh_failure", "high"
    if event in ALERT_TYPES:
        return ALERT_TYPES[event]
    log.warning("alert event %r has no type in tasks/alerts.py ALERT_TYPES; typed by its status %r", event, status)
    return ("refresh_failure", "high") if status in FAILURE_STATUSES else ("refresh_warning", "warning")


@dataclass
class Alert:
    """One alert's payload (docs/webhook.schema.json).

    ``type``, ``severity``, ``table_schema``, ``table_name`` and ``error_message`` are derived from the fields
    below (never set apart, so they cannot disagree): the deployment guide's receiver reads ``table_name``,
    ``error_message`` and ``audit_log_id``.
    """

    event: str
    status: str
    table: str | None = None  # the registry name, "schema.table"
    error: str | None = None
    flow_run_id: str | None = None
    flow_run_url: str | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    sent_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    audit_log_id: int | None = None  # the refresh_audit_log row of the run that raised it, where there is one

    @property
    def type(self) -> str:
        return classify(self.event, self.status)[0]

    @property
    def severity(self) -> str:
        return classify(self.event, self.status)[1]

    @property
    def table_schema(self) -> str | None:
        return self.table.split(".", 1)[0] if self.table and "." in self.table else None

    @property
    def table_name(self) -> str | None:
        return self.table.split(".", 1)[1] if self.table and "." in self.table else self.table

    def payload(self) -> dict[str, Any]:
        alert_type, severity = classify(self.event, self.status)
        return {**asdict(self), "type": alert_type, "severity": severity, "table_schema": self.table_schema,
                "table_name": self.table_name, "error_message": self.error}

    def body(self) -> bytes:
        return json.dumps(self.payload(), default=str, sort_keys=True).encode()


def sign(body: bytes, secret: str) -> str:
    """The signature header's value: sha256=<hex HMAC of the raw body>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str) -> bool:
    """Check a signature in constant time (for receivers, and for our tests)."""
    return hmac.compare_digest(sign(body, secret), header)


@dataclass
class Delivery:
    channel: str
    delivered: bool
    attempts: int
    error: str | None


def _post(url: str, body: bytes, headers: dict[str, str], attempts: int, timeout_s: float) -> Delivery:
    parts = urlsplit(url)  # the channel names the host only: a webhook URL's path or user info can be a secret
    channel = (f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname) or "webhook"
    error = None
    for attempt in range(1, attempts + 1):
        try:
            response = httpx.post(url, content=body, headers=headers, timeout=timeout_s)
            if response.status_code < 300:
                return Delivery(channel, True, attempt, None)
            error = f"HTTP {response.status_code}"
            if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                return Delivery(channel, False, attempt, error)
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        if attempt < attempts:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
    return Delivery(channel, False, attempts, error)


def send_alert(settings: Settings, alert: Alert, conn: psycopg.Connection[Any] | None = None) -> list[Delivery]:
    """Send ``alert`` to every configured webhook (and notification block); record each delivery.

    Never raises: an alert that cannot be delivered is recorded as undelivered and logged.
    """
    if alert.error:
        alert = replace(alert, error=redact(alert.error))
    body = alert.body()
    headers = {"Content-Type": "application/json", "User-Agent": "bq-refresh"}
    if settings.webhook_secret is not None:
        headers[SIGNATURE_HEADER] = sign(body, settings.webhook_secret.get_secret_value())
    deliveries = []
    for url in [u.strip() for u in (settings.webhook_url or "").split(",") if u.strip()]:
        deliveries.append(_post(url, body, headers, settings.webhook_attempts, settings.webhook_timeout_s))
    if settings.notification_block:
        deliveries.append(_notify_block(settings.notification_block, alert))
    for d in deliveries:
        if not d.delivered:
            log.warning("alert %s to %s undelivered after %d attempt(s): %s", alert.event, d.channel, d.attempts,
                        redact(d.error or ""))
    if conn is not None and deliveries:
        try:
            record(conn, settings.schema_name, alert, deliveries)
        except psycopg.Error as exc:
            log.warning("could not record alert deliveries: %s", exc)
    return deliveries


def _notify_block(name: str, alert: Alert) -> Delivery:
    try:
        from typing import cast

        from prefect.blocks.abstract import NotificationBlock
        from prefect.blocks.core import Block

        if "/" not in name:
            return Delivery(f"block:{name}", False, 0, "REFRESH_NOTIFICATION_BLOCK must be 'block-type/name'")
        block = cast(NotificationBlock, Block.load(name))
        subject = f"bq-refresh {alert.severity} {alert.event}: {alert.table or 'run'} {alert.status}"
        text = f"{subject}\n{alert.error or ''}\n{json.dumps(alert.counts, default=str)}"
        block.notify(text, subject=subject)  # type: ignore[unused-coroutine]  # sync in a sync context
        return Delivery(f"block:{name}", True, 1, None)
    except Exception as exc:  # noqa: BLE001 - an alert channel failing must not fail the refresh
        return Delivery(f"block:{name}", False, 1, type(exc).__name__)


def record(conn: psycopg.Connection[Any], schema: str, alert: Alert, deliveries: list[Delivery]) -> None:
    table_schema, table_name = alert.table_schema, alert.table_name
    for d in deliveries:
        conn.execute(
            sql.SQL("INSERT INTO {} (event, table_schema, table_name, flow_run_id, channel, status, attempts,"
                    " last_error, payload) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)").format(
                ident(schema, "refresh_alerts")),
            (alert.event, table_schema, table_name, alert.flow_run_id, d.channel,
             "delivered" if d.delivered else "undelivered", d.attempts, d.error, Jsonb(json.loads(alert.body()))),
        )
    if not conn.autocommit:
        conn.commit()


def failure_alerts(conn: psycopg.Connection[Any], schema: str, tables: list[str],
                   since: datetime) -> dict[str, bool]:
    """The tables (registry names) of ``tables`` that some run reported failed (an alert of type refresh_failure or
    view_failure) since ``since``, each with whether one of those alerts was delivered to some channel."""
    rows = conn.execute(
        sql.SQL("SELECT table_schema || '.' || table_name, bool_or(status = 'delivered') FROM {}"
                " WHERE created_at >= %s AND table_schema || '.' || table_name = ANY(%s)"
                " AND payload->>'type' IN ('refresh_failure', 'view_failure') GROUP BY 1").format(
            ident(schema, "refresh_alerts")),
        (since, tables)).fetchall()
    return {str(r[0]): bool(r[1]) for r in rows}
