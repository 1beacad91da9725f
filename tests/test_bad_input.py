"""Bad input, all in one nightly run: each bad table gets a clear error naming the table and the column or
value, an audit row and an alert; the good tables refresh normally; names carrying SQL are identifiers."""

from __future__ import annotations

import json
from datetime import date
from decimal import Decimal
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from psycopg.types.json import Jsonb

from blocks import BigQuerySource
from bq_refresh.settings import Settings
from flows.daily_refresh import daily_refresh, night_summary
from tasks.migrations import apply_migrations
from tasks.registry import add_dependency, register_table
from tests.bqdata import assert_same_rows, bq_schema, force_dependency, pg_rows, put_table, source_rows
from tests.conftest import WebhookReceiver
from tests.test_engine import SQP_KEY, SQP_SCHEMA, T0, sqp_rows

# Orchestration and source-side checks over the SQL paths every server version runs elsewhere: first pass only.
pytestmark = [pytest.mark.emulator, pytest.mark.once, pytest.mark.usefixtures("prefect_harness")]

EVIL_TABLE = "Robert'); DROP TABLE sentinel; -- ✓"
EVIL_COLUMN = 'imp"; DROP TABLE sentinel; --'
EVIL_VALUE = "'); DROP TABLE sentinel; --"
LOOSE_SCHEMA = bq_schema([("start_date", "DATE"), ("asin", "STRING"), ("search_query", "STRING"),
                          ("impressions", "INT64"), ("updated_at", "TIMESTAMP")])


def loose_rows(rows: list[tuple[Any, ...]]) -> pa.Table:
    cols = list(zip(*rows, strict=True))
    return pa.table({"start_date": pa.array(cols[0], pa.date32()), "asin": pa.array(cols[1], pa.string()),
                     "search_query": pa.array(cols[2], pa.string()), "impressions": pa.array(cols[3], pa.int64()),
                     "updated_at": pa.array(cols[4], pa.timestamp("us", tz="UTC"))})


def test_each_bad_table_is_named_audited_and_alerted_while_the_good_ones_refresh(
    env: Settings, pg: psycopg.Connection[Any], webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch,
) -> None:
    schema = env.schema_name
    apply_migrations(pg, schema)
    monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("REFRESH_RETRY_DELAY_SECONDS", "0.1")
    source = BigQuerySource.from_settings(env)
    evil_rows = sqp_rows(300)
    evil_rows = evil_rows.set_column(2, "search_query", pa.array([EVIL_VALUE if i == 7 else q for i, q in
                                                                 enumerate(evil_rows.column("search_query").to_pylist())]))
    put_table(source, "sqp", SQP_SCHEMA, evil_rows)
    put_table(source, "loose_nulls", LOOSE_SCHEMA, loose_rows(
        [(date(2025, 1, 5), "B01", "q1", 1, T0), (date(2025, 1, 5), None, "q2", 2, T0), (None, "B02", "q3", 3, T0)]))
    put_table(source, "loose_dupes", LOOSE_SCHEMA, loose_rows(
        [(date(2025, 1, 5), "B01", "q1", 1, T0), (date(2025, 1, 5), "B01", "q1", 2, T0.replace(hour=13)),
         (date(2025, 1, 5), "B02", "q1", 3, T0)]))
    pg.execute(f'CREATE TABLE "{schema}".sentinel (x int)')
    ok = {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"}

    register_table(pg, schema, "good", ok)
    register_table(pg, schema, EVIL_TABLE, {**ok, "rename": {"impressions": EVIL_COLUMN, "asin": "äsin ✓"},
                                            "key": ["start_date", "asin", "search_query"]})
    register_table(pg, schema, "unknown_source", {**ok, "source": "no_such_table"})
    register_table(pg, schema, "unknown_key", {**ok, "key": ["start_date", "no_such_key"]})
    register_table(pg, schema, "unknown_cursor", {**ok, "cursor": "no_such_cursor"})
    register_table(pg, schema, "text_cursor", {**ok, "cursor": "asin"})
    register_table(pg, schema, "null_keys", {"source": "loose_nulls", "key": SQP_KEY, "cursor": "updated_at"})
    register_table(pg, schema, "dupe_keys", {"source": "loose_dupes", "key": SQP_KEY, "cursor": "updated_at"})
    register_table(pg, schema, "malformed", ok)
    # A registry row edited by hand into nonsense (the API and CLI refuse it; SQL does not).
    pg.execute(f'UPDATE "{schema}".refresh_config SET custom_sync_params = %s WHERE table_name = %s',
               (Jsonb({"source": "sqp", "key": "start_date", "batch_size": "lots", "lookback": "7 fortnights"}), "malformed"))
    register_table(pg, schema, "cycle_a", ok)
    register_table(pg, schema, "cycle_b", ok)
    add_dependency(pg, schema, "cycle_a", "cycle_b")
    force_dependency(pg, schema, "cycle_b", "cycle_a")

    state = daily_refresh(return_state=True)
    assert state.is_failed()
    tables = {t["table"]: t for t in night_summary(state)["tables"]}

    expected_errors = {
        "unknown_source": ["no_such_table", "not found"],
        "unknown_key": ["no_such_key", "not found"],
        "unknown_cursor": ["no_such_cursor", "not found"],
        "text_cursor": ["'asin'", "STRING"],
        "malformed": ["batch_size", "lookback", "key"],
        "cycle_a": ["dependency cycle", "cycle_b -> "],
        "cycle_b": ["dependency cycle", "cycle_a -> "],
    }
    audit = {r[0]: r for r in pg.execute(
        f'SELECT table_name, status, error_message, rows_inserted, sync_metadata FROM "{schema}".refresh_audit_log').fetchall()}
    alerts = [json.loads(r["body"]) for r in webhook.received]
    for name, words in expected_errors.items():
        full = f"{schema}.{name}"
        assert tables[full]["status"] == "failed", tables[full]
        message = audit[name][2]
        assert audit[name][1] == "failed" and full in message, audit[name]
        for word in words:
            assert word in message, (name, message)
        assert any(a["event"] == "table_failed" and a["table"] == full and a["error"] and word in a["error"]
                   for a in alerts), (name, alerts)
        assert not pg.execute("SELECT to_regclass(%s)", (f'"{schema}"."{name}"',)).fetchone()[0] or name.startswith("cycle")

    # Rows that cannot be published are set aside or resolved, named, audited and alerted.
    for name, field, count in (("null_keys", "rows_quarantined", 2), ("dupe_keys", "duplicate_keys", 1)):
        full = f"{schema}.{name}"
        assert tables[full]["status"] == "warning" and audit[name][1] == "warning"
        assert audit[name][4][field] == count
        alert = next(a for a in alerts if a["event"] == "rows_rejected" and a["table"] == full)
        assert "start_date, asin, search_query" in alert["error"] and alert["details"][field] == count
    quarantined = pg.execute(f'SELECT row_data FROM "{schema}".refresh_quarantine ORDER BY id').fetchall()
    assert [q[0]["search_query"] for q in quarantined] == ["q2", "q3"]
    assert pg.execute(f'SELECT impressions FROM "{schema}".dupe_keys WHERE asin = %s', ("B01",)).fetchall() == [(2,)]

    # The good tables refreshed, the evil names are plain identifiers and the evil value plain data.
    assert tables[f"{schema}.good"]["status"] == "success"
    assert_same_rows(source_rows(source, "sqp"), pg_rows(pg, f'"{schema}".good', "1"), SQP_KEY)
    evil = tables[f"{schema}.{EVIL_TABLE}"]
    assert evil["status"] == "success" and evil["rows_inserted"] == 300, evil
    published = pg_rows(pg, f'"{schema}"."{EVIL_TABLE.replace(chr(34), chr(34) * 2)}"', "1")
    assert_same_rows(source_rows(source, "sqp"), published, SQP_KEY,
                     rename={"asin": "äsin ✓", "impressions": EVIL_COLUMN})
    assert EVIL_VALUE in {r["search_query"] for r in published}
    assert pg.execute(f'SELECT count(*) FROM "{schema}".sentinel').fetchone() == (0,)  # still there
    assert isinstance(evil_rows.column("median_price")[0].as_py(), Decimal)


def test_wrong_credentials_are_a_clear_error_and_nothing_changes(
    env: Settings, pg: psycopg.Connection[Any], webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch,
    token_server: Any,
) -> None:
    """A service-account key the token endpoint refuses (invalid_grant): the official client's own
    token exchange against a real local HTTP server playing Google's OAuth endpoint."""
    from flows.refresh_table import refresh_table

    schema = env.schema_name
    apply_migrations(pg, schema)
    source = BigQuerySource.from_settings(env)
    put_table(source, "sqp", SQP_SCHEMA, sqp_rows(50))
    register_table(pg, schema, "sqp", {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"})
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS_JSON", token_server.key_json)
    monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("REFRESH_RETRY_DELAY_SECONDS", "0.1")
    with pytest.raises(Exception) as failure:
        refresh_table("sqp")
    text = str(failure.value)
    assert f"{schema}.sqp" in text and "credentials rejected" in text and "invalid_grant" in text, text
    assert token_server.calls >= 1
    # Permanent: not retried; no table created; audited and alerted.
    assert token_server.calls == 1
    assert pg.execute("SELECT to_regclass(%s)", (f'"{schema}".sqp',)).fetchone() == (None,)
    row = pg.execute(f'SELECT status, error_message FROM "{schema}".refresh_audit_log').fetchone()
    assert row is not None and row[0] == "failed" and "credentials rejected" in row[1]
    assert "table_failed" in webhook.events()
