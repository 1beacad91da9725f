"""Publish groups: tables that dashboards join are staged and checked each on its own and published together in
one PostgreSQL transaction, all or none; a member that fails holds the whole group at its previous data, with
one alert naming the member. Real PostgreSQL, the emulator, a local webhook receiver; the target is compared
with the source by the independent comparator (tests/comparator.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from blocks import BigQuerySource
from bq_refresh.errors import ConfigError
from bq_refresh.settings import Settings
from flows.daily_refresh import daily_refresh, night_summary
from flows.refresh_table import refresh_table
from tasks.registry import RegistryEntry, complete_groups, register_table
from tests.bqdata import assert_same_rows, bq_schema, pg_rows, put_table, source_rows
from tests.conftest import WebhookReceiver
from tests.test_webhook_contract import validator

T0 = datetime(2026, 11, 1, 3, tzinfo=UTC)
PARENT = bq_schema([("asin", "STRING"), ("title", "STRING"), ("updated_at", "TIMESTAMP")])
CHILD = bq_schema([("asin", "STRING"), ("week", "DATE"), ("clicks", "INT64"), ("updated_at", "TIMESTAMP")])


def parents(n: int, title: str, at: datetime) -> pa.Table:
    return pa.table({"asin": [f"A{i:03d}" for i in range(n)], "title": [f"{title} {i}" for i in range(n)],
                     "updated_at": pa.array([at] * n, pa.timestamp("us", tz="UTC"))})


def children(n: int, clicks: int, at: datetime, *, negative: int = 0) -> pa.Table:
    """``n`` ASINs x 2 weeks; the first ``negative`` rows carry -1 clicks (outside the gate's range)."""
    keys = [(f"A{i:03d}", w) for i in range(n) for w in (datetime(2026, 10, 5).date(), datetime(2026, 10, 12).date())]
    values = [-1 if j < negative else clicks + j for j in range(len(keys))]
    return pa.table({"asin": [k[0] for k in keys], "week": pa.array([k[1] for k in keys], pa.date32()),
                     "clicks": pa.array(values, pa.int64()), "updated_at": pa.array([at] * len(keys), pa.timestamp("us", tz="UTC"))})


def live(pg: psycopg.Connection[Any], schema: str, table: str) -> list[dict[str, Any]]:
    return pg_rows(pg, f'"{schema}".{table}', "1, 2")


def writers(pg: psycopg.Connection[Any], schema: str, tables: list[str]) -> set[str]:
    """The transactions that wrote the live rows (xmin): one group publish = one transaction."""
    return {str(r[0]) for t in tables for r in pg.execute(f'SELECT DISTINCT xmin::text FROM "{schema}".{t}')}


def alerts(webhook: WebhookReceiver) -> list[dict[str, Any]]:
    return [json.loads(r["body"]) for r in webhook.received]


@pytest.fixture
def group(env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
          webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch) -> str:
    """Two joined tables in publish group 'sqp', loaded on night 1 (in one transaction)."""
    monkeypatch.setenv("REFRESH_WEBHOOK_URL", webhook.url)
    monkeypatch.setenv("REFRESH_RETRIES", "0")
    s = registry
    put_table(source, "parent", PARENT, parents(30, "night 1", T0))
    put_table(source, "child", CHILD, children(30, 100, T0))
    register_table(pg, s, "parent", {"source": "parent", "key": ["asin"], "cursor": "updated_at",
                                     "publish_group": "sqp"}, priority=200)  # published first in the group
    register_table(pg, s, "child", {"source": "child", "key": ["asin", "week"], "cursor": "updated_at",
                                    "publish_group": "sqp", "delete_policy": {"mode": "hard", "max_delete_fraction": 0.5},
                                    "checks": {"ranges": {"clicks": [0, None]}, "hard": ["row_count", "checksum",
                                                                                         "published_count", "range"]}})
    register_table(pg, s, "loner", {"source": "parent", "key": ["asin"], "cursor": "updated_at"})
    state = daily_refresh(return_state=True)
    assert state.is_completed(), state.message
    runs = {r["table"]: r for r in night_summary(state)["tables"]}
    assert {runs[f"{s}.parent"]["status"], runs[f"{s}.child"]["status"]} == {"success"}
    assert runs[f"{s}.parent"]["direct_load"] is False  # a member stages: a direct load publishes alone
    assert_same_rows(source_rows(source, "parent"), live(pg, s, "parent"), ["asin"])
    assert_same_rows(source_rows(source, "child"), live(pg, s, "child"), ["asin", "week"])
    assert len(writers(pg, s, ["parent", "child"])) == 1
    assert pg.execute(f'SELECT count(*) FROM "{s}".refresh_audit_log WHERE sync_metadata->>\'publish_group\''
                      " = 'sqp' AND status = 'success'").fetchone() == (2,)
    webhook.received.clear()
    return s


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_a_member_failing_its_quality_gate_holds_the_group_then_both_publish_together(
    env: Settings, pg: psycopg.Connection[Any], source: BigQuerySource, group: str, webhook: WebhookReceiver,
) -> None:
    s = group
    before = {t: live(pg, s, t) for t in ("parent", "child")}
    watermarks = dict(pg.execute(f'SELECT table_name, watermark FROM "{s}".refresh_config').fetchall())
    # Night 2: new titles for the parent; the child's new rows fail its hard range gate (3 negative clicks).
    put_table(source, "parent", PARENT, parents(30, "night 2", T0 + timedelta(days=1)))
    put_table(source, "child", CHILD, children(30, 200, T0 + timedelta(days=1), negative=3))
    state = daily_refresh(force=True, return_state=True)
    assert state.is_failed()
    runs = {r["table"]: r for r in night_summary(state)["tables"]}
    assert runs[f"{s}.child"]["status"] == "failed" and "range" in runs[f"{s}.child"]["error"]
    assert runs[f"{s}.parent"]["status"] == "skipped" and "held: publish group 'sqp'" in runs[f"{s}.parent"]["reason"]
    assert runs[f"{s}.loner"]["status"] == "success"  # not in the group: published
    for t in ("parent", "child"):  # yesterday's data, value by value
        assert_same_rows(before[t], live(pg, s, t), ["asin"] if t == "parent" else ["asin", "week"], ignore=())
    now = dict(pg.execute(f'SELECT table_name, watermark FROM "{s}".refresh_config').fetchall())
    assert {t: now[t] for t in ("parent", "child")} == {t: watermarks[t] for t in ("parent", "child")}
    audit = dict(pg.execute(f'SELECT table_name, status FROM "{s}".refresh_audit_log WHERE id IN (SELECT max(id)'
                            f' FROM "{s}".refresh_audit_log GROUP BY table_name)').fetchall())
    assert (audit["parent"], audit["child"]) == ("skipped", "failed")
    staging = pg.execute("SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename NOT LIKE %s",
                         (env.staging_schema, "%_rowhash")).fetchone()  # the live tables' row hashes stay
    assert staging == (0,)  # the held member's staging discarded: the next run reads both at one snapshot
    group_alerts = [a for a in alerts(webhook) if a["table"] in {f"{s}.parent", f"{s}.child"}]
    assert [(a["event"], a["table_name"]) for a in group_alerts] == [("quality_check_failed", "child")]
    assert group_alerts[0]["details"]["publish_group"] == "sqp" and "publish group 'sqp' held" in group_alerts[0]["error"]
    assert not list(validator().iter_errors(group_alerts[0]))

    # Night 3: the child's source is fixed; both publish, together, with night 2's parent rows.
    put_table(source, "child", CHILD, children(30, 300, T0 + timedelta(days=2)))
    state = daily_refresh(force=True, return_state=True)
    assert state.is_completed(), state.message
    assert_same_rows(source_rows(source, "parent"), live(pg, s, "parent"), ["asin"])
    assert_same_rows(source_rows(source, "child"), live(pg, s, "child"), ["asin", "week"])
    assert len(writers(pg, s, ["parent", "child"])) == 1


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_a_member_failing_inside_the_group_publish_rolls_back_the_members_published_before_it(
    env: Settings, pg: psycopg.Connection[Any], source: BigQuerySource, group: str, webhook: WebhookReceiver,
) -> None:
    """The parent publishes first in the group's transaction; the child's delete guard (80% of its rows gone,
    over max_delete_fraction 0.5) then refuses: the parent's publish is rolled back with it."""
    s = group
    before = {t: live(pg, s, t) for t in ("parent", "child")}
    put_table(source, "parent", PARENT, parents(30, "night 2", T0 + timedelta(days=1)))
    put_table(source, "child", CHILD, children(6, 200, T0 + timedelta(days=1)))
    state = daily_refresh(tables=[f"{s}.parent"], return_state=True)  # the group's other member comes along
    assert state.is_failed()
    runs = {r["table"]: r for r in night_summary(state)["tables"]}
    assert set(runs) == {f"{s}.parent", f"{s}.child"}
    assert runs[f"{s}.child"]["status"] == "failed" and "refusing to delete 48 of 60" in runs[f"{s}.child"]["error"]
    assert runs[f"{s}.parent"]["status"] == "skipped"
    for t in ("parent", "child"):
        assert_same_rows(before[t], live(pg, s, t), ["asin"] if t == "parent" else ["asin", "week"], ignore=())
    group_alerts = [a for a in alerts(webhook) if a["table"] in {f"{s}.parent", f"{s}.child"}]
    assert [(a["event"], a["table_name"]) for a in group_alerts] == [("quality_check_failed", "child")]
    assert group_alerts[0]["details"] == {"publish_group": "sqp", "held": [f"{s}.parent"]}
    assert group_alerts[0]["audit_log_id"] == runs[f"{s}.child"]["audit_id"]
    # With the deletes allowed by the user (max_delete_fraction 0.9), the next night publishes both, exact.
    pg.execute(f"""UPDATE "{s}".refresh_config SET custom_sync_params = jsonb_set(custom_sync_params,
                   '{{delete_policy,max_delete_fraction}}', '0.9') WHERE table_name = 'child'""")
    assert daily_refresh(force=True, return_state=True).is_completed()
    assert_same_rows(source_rows(source, "parent"), live(pg, s, "parent"), ["asin"])
    assert_same_rows(source_rows(source, "child"), live(pg, s, "child"), ["asin", "week"])
    assert len(writers(pg, s, ["parent", "child"])) == 1


@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.usefixtures("prefect_harness")
def test_a_skipped_member_holds_the_group_with_one_group_held_alert_and_a_member_never_publishes_alone(
    env: Settings, pg: psycopg.Connection[Any], pg_uri: str, source: BigQuerySource, group: str,
    webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = group
    before = live(pg, s, "parent")
    put_table(source, "parent", PARENT, parents(30, "night 2", T0 + timedelta(days=1)))
    monkeypatch.setenv("REFRESH_LOCK_WAIT_SECONDS", "1")
    with psycopg.connect(pg_uri, autocommit=True) as other:  # another run holds the child
        other.execute("SELECT pg_advisory_lock(hashtext('bq-refresh:' || %s))", (f"{s}.child",))
        state = daily_refresh(force=True, return_state=True)
    assert state.is_completed()  # nothing failed: one table skipped, its group held
    runs = {r["table"]: r for r in night_summary(state)["tables"]}
    assert runs[f"{s}.child"]["status"] == "skipped" and runs[f"{s}.parent"]["status"] == "skipped"
    assert "child (skipped) did not refresh" in runs[f"{s}.parent"]["reason"]
    assert_same_rows(before, live(pg, s, "parent"), ["asin"], ignore=())
    group_alerts = [a for a in alerts(webhook) if a["table"] in {f"{s}.parent", f"{s}.child"}]
    assert [(a["event"], a["table_name"], a["type"]) for a in group_alerts] == [("group_held", "child", "refresh_failure")]
    assert group_alerts[0]["details"] == {"publish_group": "sqp", "held": [f"{s}.parent"]}
    assert not list(validator().iter_errors(group_alerts[0]))

    # The per-table flow (the refresh-table deployment) refuses to publish a member alone.
    with pytest.raises(ConfigError, match=r"publish group 'sqp'.*bq-refresh run --table"):
        refresh_table(f"{s}.parent")
    assert_same_rows(before, live(pg, s, "parent"), ["asin"], ignore=())


def entry(name: str, group: str | None, enabled: bool = True) -> RegistryEntry:
    params: dict[str, Any] = {"source": name, "key": ["id"], "cursor": "u"}
    if group:
        params["publish_group"] = group
    return RegistryEntry(id=1, table_schema="s", table_name=name, is_enabled=enabled, refresh_frequency_hours=24,
                         priority=1, last_refresh_at=None, next_refresh_at=None, watermark=None, source_schema=None,
                         params=params)


def test_a_due_member_brings_its_whole_group_along() -> None:
    every = [entry("a", "g"), entry("b", "g"), entry("c", None), entry("d", "g", enabled=False), entry("e", "h"),
             entry("bad", None)]
    every[-1].params = {"key": "not a list"}  # invalid parameters: in no group (its own run says why)
    chosen, added = complete_groups([every[0], every[2]], every)
    assert [e.name for e in chosen] == ["s.a", "s.b", "s.c"] and added == {"s.b": "g"}
    assert complete_groups([every[2]], every) == ([every[2]], {})
    chosen, added = complete_groups([every[5]], every)
    assert [e.name for e in chosen] == ["s.bad"] and added == {}
