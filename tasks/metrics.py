"""Prometheus metrics of the refresh: counters that never go down (refresh_totals) and 30-day gauges."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from psycopg import sql
from psycopg.rows import dict_row

from tasks.sqlnames import ident

ROW_KINDS = ("read", "inserted", "updated", "deleted")


def totals(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    """Per table, everything ever counted (migration 009's trigger keeps them as audit rows finish; archiving
    or deleting audit rows takes nothing away)."""
    query = sql.SQL(
        "SELECT table_schema || '.' || table_name AS table, runs, successes, failures, skipped, rows_read,"
        " rows_inserted, rows_updated, rows_deleted, run_seconds, last_success_at FROM {} ORDER BY 1"
    ).format(ident(schema, "refresh_totals"))
    with conn.cursor(row_factory=dict_row) as cur:
        return list(cur.execute(query).fetchall())


class RefreshCollector:
    """One scrape's figures, as prometheus_client metric families."""

    def __init__(self, totals: list[dict[str, Any]], window: list[dict[str, Any]],
                 in_progress: list[dict[str, Any]], now: datetime) -> None:
        self.totals, self.window, self.in_progress, self.now = totals, window, in_progress, now

    def collect(self) -> Iterator[Metric]:
        runs = CounterMetricFamily("bq_refresh_runs", "Table runs finished (skipped ones apart), ever.",
                                   labels=["table"])
        successes = CounterMetricFamily("bq_refresh_successes", "Table runs that ended success or warning, ever.",
                                        labels=["table"])
        failures = CounterMetricFamily("bq_refresh_failures", "Table runs that ended failed, ever.", labels=["table"])
        skipped = CounterMetricFamily("bq_refresh_skipped", "Table runs skipped (a hard dependency failed), ever.",
                                      labels=["table"])
        rows = CounterMetricFamily("bq_refresh_rows", "Rows read from BigQuery and written to PostgreSQL, ever.",
                                   labels=["table", "kind"])
        seconds = CounterMetricFamily("bq_refresh_run_seconds", "Time spent in table runs, ever.", labels=["table"])
        last_success = GaugeMetricFamily("bq_refresh_last_success_timestamp_seconds",
                                         "When the table's last successful run finished (Unix time).", labels=["table"])
        since_success = GaugeMetricFamily("bq_refresh_seconds_since_last_success",
                                          "Seconds since the table's last successful run finished.", labels=["table"])
        for t in self.totals:
            label = [t["table"]]
            runs.add_metric(label, t["runs"])
            successes.add_metric(label, t["successes"])
            failures.add_metric(label, t["failures"])
            skipped.add_metric(label, t["skipped"])
            for kind in ROW_KINDS:
                rows.add_metric([t["table"], kind], t["rows_" + kind])
            seconds.add_metric(label, float(t["run_seconds"]))
            if t["last_success_at"] is not None:
                last_success.add_metric(label, t["last_success_at"].timestamp())
                since_success.add_metric(label, (self.now - t["last_success_at"]).total_seconds())
        yield from (runs, successes, failures, skipped, rows, seconds, last_success, since_success)

        runs_30d = GaugeMetricFamily("bq_refresh_runs_30d", "Table runs finished in the last 30 days.", labels=["table"])
        failures_30d = GaugeMetricFamily("bq_refresh_failures_30d", "Failed table runs in the last 30 days.",
                                         labels=["table"])
        rate_30d = GaugeMetricFamily("bq_refresh_success_rate_30d",
                                     "Share of the last 30 days' finished runs that succeeded (0-1).", labels=["table"])
        duration_30d = GaugeMetricFamily("bq_refresh_avg_duration_seconds_30d",
                                         "Mean duration of the last 30 days' successful runs.", labels=["table"])
        for w in self.window:
            label = [w["table"]]
            runs_30d.add_metric(label, w["runs"])
            failures_30d.add_metric(label, w["failures"])
            if w["success_rate"] is not None:
                rate_30d.add_metric(label, w["success_rate"])
            if w["avg_duration_ms"] is not None:
                duration_30d.add_metric(label, w["avg_duration_ms"] / 1000.0)
        yield from (runs_30d, failures_30d, rate_30d, duration_30d)

        running = GaugeMetricFamily("bq_refresh_tables_in_progress", "Table runs in progress.")
        running.add_metric([], len(self.in_progress))
        staged = GaugeMetricFamily("bq_refresh_rows_staged", "Rows staged so far by a table run in progress.",
                                   labels=["table"])
        expected = GaugeMetricFamily("bq_refresh_rows_expected",
                                     "Rows a table run in progress expects to read (the read session's estimate).",
                                     labels=["table"])
        for p in self.in_progress:
            if p["rows_staged"] is not None:
                staged.add_metric([p["table"]], p["rows_staged"])
            if p["rows_expected"] is not None:
                expected.add_metric([p["table"]], p["rows_expected"])
        yield from (running, staged, expected)


def prometheus_text(totals: list[dict[str, Any]], window: list[dict[str, Any]], in_progress: list[dict[str, Any]],
                    now: datetime) -> bytes:
    """The metrics in the Prometheus text exposition format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RefreshCollector(totals, window, in_progress, now))  # type: ignore[arg-type]
    return generate_latest(registry)
