"""Partitioned sources (tasks/partitions.py): the partitioning read from the table's metadata, the partition
predicate every read session of a require_partition_filter table carries (a first load reads every partition, NULL
included), and pseudo-columns refused as key, cursor or window of a table source.

BigQuery refuses a read session on a require_partition_filter table without "a filter that can be used for
partition elimination" (INVALID_ARGUMENT "Cannot query over table '...' without a filter over column(s) '...' that
can be used for partition elimination": GoogleCloudPlatform/DataflowTemplates#2273, SAS Problem Note 68636); the rule
of what qualifies is cloud.google.com/bigquery/docs/querying-partitioned-tables, "Require a partition filter in
queries": at least one predicate that references only the partitioning column (``partition_id = "foo" AND f =
"bar"`` qualifies, ``(partition_id = "foo" OR f = "bar")`` does not). The local emulator neither refuses nor keeps
``Table.require_partition_filter`` set through the API (it keeps the one DDL puts inside timePartitioning), so the
refusal is played by ``PartitionFilterRequired``, the Storage Read stand-in with that rule added.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import grpc
import psycopg
import pyarrow as pa
import pytest
import sqlglot
from google.cloud import bigquery
from sqlglot import exp

from blocks import BigQuerySource
from bq_refresh.errors import ConfigError, SourceError
from bq_refresh.settings import Settings
from tasks import extract, partitions
from tasks.registry import register_table
from tasks.sources import resolve_source
from tasks.spec import TableSpec
from tests.bqdata import bq_schema, pg_rows, put_table, run_sql
from tests.storage_standin import StorageStandIn, table_path

DATE_FILTER = "(`d` IS NULL OR `d` >= DATE '0001-01-01')"
INGESTION_FILTER = "(_PARTITIONTIME IS NULL OR _PARTITIONTIME >= TIMESTAMP '0001-01-01 00:00:00+00')"


def table(time_field: str | None = "", *, range_field: str | None = None, required: bool = False,
          legacy_required: bool = False) -> bigquery.Table:
    """A Table as the client library builds it from tables.get (time_field None: no time partitioning; '':
    ingestion time)."""
    t = bigquery.Table("p.d.t", schema=bq_schema([("d", "DATE"), ("ts", "TIMESTAMP"), ("n", "INT64")]))
    if time_field is not None:
        t.time_partitioning = bigquery.TimePartitioning(field=time_field or None)
        if legacy_required:
            t.time_partitioning.require_partition_filter = True
    if range_field is not None:
        t.range_partitioning = bigquery.RangePartitioning(field=range_field, range_=bigquery.PartitionRange(0, 100, 10))
    if required:
        t.require_partition_filter = True
    return t


TYPES = {"d": "DATE", "ts": "TIMESTAMP", "n": "INTEGER"}


@pytest.mark.once
@pytest.mark.second
@pytest.mark.parametrize(("given", "expected"), [
    (table("d", required=True), DATE_FILTER),
    (table("ts", legacy_required=True), "(`ts` IS NULL OR `ts` >= TIMESTAMP '0001-01-01 00:00:00+00')"),
    (table("", required=True), INGESTION_FILTER),
    (table(None, range_field="n", required=True), f"(`n` IS NULL OR `n` >= {-(2**63)})"),
    (table("d"), ""),  # partitioned, no filter required: reads as before
    (table(None), ""),
], ids=["date column", "timestamp column, required inside timePartitioning", "ingestion time", "integer range",
        "not required", "not partitioned"])
def test_the_partition_predicate_follows_the_tables_metadata(given: bigquery.Table, expected: str) -> None:
    assert partitions.partition_filter(given, TYPES) == expected


@pytest.mark.once
@pytest.mark.second
@pytest.mark.parametrize(("restriction", "expected"), [
    ("", DATE_FILTER),
    ("`updated_at` >= TIMESTAMP '2026-01-01T00:00:00+00:00'",
     f"(`updated_at` >= TIMESTAMP '2026-01-01T00:00:00+00:00') AND {DATE_FILTER}"),
    (f"(`x` = 1) AND {DATE_FILTER}", f"(`x` = 1) AND {DATE_FILTER}"),  # a recreated session repeats its own
])
def test_the_predicate_is_anded_to_the_reads_own_restriction_and_qualifies(restriction: str, expected: str) -> None:
    restricted = partitions.restrict(restriction, DATE_FILTER)
    assert restricted == expected
    assert qualifies(restricted, "d") and qualifies(restriction, "d") == (DATE_FILTER in restriction)
    assert partitions.restrict(restriction, "") == restriction


@pytest.mark.once
@pytest.mark.second
@pytest.mark.parametrize("role", ["cursor", "window_column", "key"])
def test_a_pseudo_column_is_refused_for_a_table_source_and_allowed_by_name_in_a_query_source(role: str) -> None:
    params: dict[str, Any] = {"source": "events", "key": ["id"], "cursor": "updated_at"}
    if role == "key":
        params["key"] = ["_PARTITIONTIME"]
    elif role == "cursor":
        params["cursor"] = "_PARTITIONTIME"
    else:
        params.update(mode="window", window_column="_PARTITIONDATE")
    shown = {"cursor": "cursor", "window_column": "window", "key": "key"}[role]
    pseudo = "_PARTITIONDATE" if role == "window_column" else "_PARTITIONTIME"
    with pytest.raises(ConfigError) as refused:
        TableSpec.parse_for("s.events", params)
    assert str(refused.value) == (
        f"s.events: invalid sync parameters: custom_sync_params: Value error, {shown} column {pseudo} is a"
        " pseudo-column of an ingestion-time partitioned table: the Storage Read API reads only the table's own"
        " columns, so it cannot be read; register a query source that names it instead (--query 'SELECT *,"
        f" {pseudo} AS partition_time FROM ...' with {shown} partition_time)")
    named = {**params, "source": None, "query": f"SELECT *, {pseudo} AS partition_time FROM `p.d.events`"}
    named = {k: ("partition_time" if v == pseudo else ["partition_time"] if v == [pseudo] else v)
             for k, v in named.items() if v is not None}
    assert TableSpec.parse_for("s.events", named).query is not None


def qualifies(restriction: str, column: str) -> bool:
    """The documented rule: some top-level AND term references the partitioning column and no other column."""
    if not restriction.strip():
        return False
    tree = sqlglot.parse_one(restriction, read="bigquery")
    terms = list(tree.flatten()) if isinstance(tree, exp.And) else [tree]
    for term in terms:
        names = {c.name.lower() for c in term.find_all(exp.Column)}
        if names == {column.lower()}:
            return True
    return False


class PartitionFilterRequired(StorageStandIn):
    """The stand-in, refusing as BigQuery does a read session on a require_partition_filter table whose
    row_restriction does not qualify for partition elimination."""

    def __init__(self, required: dict[str, str], **kwargs: Any) -> None:
        self.required = {table_path(ref): column for ref, column in required.items()}
        super().__init__(**kwargs)

    def _create_read_session(self, request: Any, context: grpc.ServicerContext) -> Any:
        path = request.read_session.table
        column = self.required.get(path)
        if column is not None and not qualifies(request.read_session.read_options.row_restriction, column):
            _, project, _, dataset, _, name = path.split("/")
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"request failed: Cannot query over table '{project}.{dataset}.{name}' without a filter over"
                        f" column(s) '{column}' that can be used for partition elimination")
        return super()._create_read_session(request, context)


SCHEMA = bq_schema([("id", "INT64"), ("d", "DATE"), ("updated_at", "TIMESTAMP"), ("v", "STRING")])
T0 = datetime(2026, 1, 5, 12, tzinfo=UTC)


def events(n: int, *, updated: datetime = T0) -> pa.Table:
    """n rows over three days, and one whose partitioning date is NULL (BigQuery's __NULL__ partition)."""
    return pa.table({
        "id": pa.array(range(1, n + 1), pa.int64()),
        "d": pa.array([None if i == n else date(2026, 1, 1 + i % 3) for i in range(1, n + 1)], pa.date32()),
        "updated_at": pa.array([updated] * n, pa.timestamp("us", tz="UTC")),
        "v": pa.array([f"v{i}" for i in range(1, n + 1)], pa.string()),
    })


def partitioned_events(source: BigQuerySource, data: pa.Table) -> str:
    ref = source.table_ref("events")
    run_sql(source, f"CREATE TABLE `{ref}` (id INT64, d DATE, updated_at TIMESTAMP, v STRING) PARTITION BY d"
                    " OPTIONS (require_partition_filter = TRUE)")
    put_table(source, "events", SCHEMA, data, replace=False)
    return ref


@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.second
def test_the_emulator_keeps_the_partitioning_and_the_source_carries_its_predicate(source: BigQuerySource) -> None:
    """Tables made by DDL (the emulator keeps require_partition_filter inside timePartitioning): a column-partitioned
    one and an ingestion-time one; the resolved source of each carries the predicate its reads send."""
    partitioned_events(source, events(4))
    run_sql(source, f"CREATE TABLE `{source.table_ref('ingested')}` (id INT64) PARTITION BY _PARTITIONDATE"
                    " OPTIONS (require_partition_filter = TRUE)")
    run_sql(source, f"CREATE TABLE `{source.table_ref('plain')}` (id INT64, d DATE) PARTITION BY d")
    got = {name: resolve_source(source, table=f"s.{name}", source_ref=name, query=None).partition_filter
           for name in ("events", "ingested", "plain")}
    assert got == {"events": DATE_FILTER, "ingested": INGESTION_FILTER, "plain": ""}


@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.second
def test_a_read_session_without_the_predicate_is_refused_and_with_it_reads_every_row(source: BigQuerySource) -> None:
    data = events(9)
    ref = partitioned_events(source, data)
    with PartitionFilterRequired({ref: "d"}) as standin:
        standin.register(ref, data)
        reader = source.model_copy(update={"storage_endpoint": standin.target})
        resolved = resolve_source(reader, table="s.events", source_ref="events", query=None)
        snapshot = datetime.now(UTC) - timedelta(seconds=1)
        bare = extract.SourceTable(resolved.ref, resolved.fields)  # without the table's partitioning
        with pytest.raises(SourceError) as refused:
            extract.create_session(reader, bare, selected_fields=["id"], row_restriction="", snapshot_time=snapshot,
                                   max_streams=1, table_name="s.events")
        assert str(refused.value) == (
            f"s.events: read session refused: request failed: Cannot query over table '{ref}' without a filter over"
            " column(s) 'd' that can be used for partition elimination")
        session = extract.create_session(reader, resolved, selected_fields=["id"], row_restriction="",
                                         snapshot_time=snapshot, max_streams=1, table_name="s.events")
        assert session.row_restriction == DATE_FILTER
        assert standin.sessions[-1].row_restriction == DATE_FILTER and standin.sessions[-1].error is None


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_the_first_load_and_the_next_night_of_a_table_that_requires_a_partition_filter(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through the refresh itself, reading from a server that refuses a read without a qualifying partition filter:
    the first load (no window: the always-true predicate) lands every row, the NULL-partition row too; the next
    night reads from its watermark with the predicate ANDed."""
    from flows.refresh_table import refresh_table

    data = events(30)
    ref = partitioned_events(source, data)
    register_table(pg, registry, "events", {"source": "events", "key": ["id"], "cursor": "updated_at"})
    with PartitionFilterRequired({ref: "d"}) as standin:
        standin.register(ref, data)
        monkeypatch.setenv("BIGQUERY_STORAGE_ENDPOINT", standin.target)
        first = refresh_table("events")
        assert (first["status"], first["rows_inserted"]) == ("success", 30), first
        assert [s.row_restriction for s in standin.sessions if s.error is None] == [DATE_FILTER]
        assert [r["id"] for r in pg_rows(pg, f'"{registry}".events', "id")] == list(range(1, 31))
        assert pg.execute(f'SELECT count(*) FROM "{registry}".events WHERE d IS NULL').fetchone() == (1,)

        later = events(30, updated=T0 + timedelta(days=1)).slice(0, 5)
        put_table(source, "events", SCHEMA, later, replace=False)
        run_sql(source, f"DELETE FROM `{ref}` WHERE id <= 5 AND updated_at = TIMESTAMP '{T0.isoformat()}'")
        standin.register(ref, pa.concat_tables([later, data.slice(5)]), at=standin.now() - timedelta(seconds=30))
        night = refresh_table("events")
        assert night["status"] == "success" and night["rows_updated"] == 5, night
        restriction = [s.row_restriction for s in standin.sessions if s.error is None][-1]
        assert restriction.startswith("(`updated_at` >= TIMESTAMP ") and restriction.endswith(f") AND {DATE_FILTER}")
        assert all(s.error is None for s in standin.sessions), [s.error for s in standin.sessions]


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_a_full_refresh_counts_the_source_with_the_predicate_too(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, emulator: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full-mode table's counts (the copy is proven against them) are query jobs: BigQuery refuses those without
    a partition filter as it refuses the read session. Every query the run sends over the source carries one
    (through a recording proxy in front of the emulator's REST API)."""
    from flows.refresh_table import refresh_table
    from tests.bqrecorder import RecordingProxy

    data = events(12)
    ref = partitioned_events(source, data)
    register_table(pg, registry, "events", {"source": "events", "key": ["id"], "mode": "full"})
    proxy = RecordingProxy(emulator.rest_url)
    try:
        with PartitionFilterRequired({ref: "d"}) as standin:
            standin.register(ref, data)
            monkeypatch.setenv("BIGQUERY_STORAGE_ENDPOINT", standin.target)
            monkeypatch.setenv("BIGQUERY_API_ENDPOINT", proxy.url)
            done = refresh_table("events")
    finally:
        proxy.close()
    assert (done["status"], done["rows_inserted"]) == ("success", 12), done
    over_source = [r.query for r in proxy.jobs() if "`events`" in r.query]
    assert over_source, [r.query for r in proxy.jobs()]
    for query in over_source:
        where = query.split(" WHERE ", 1)[1] if " WHERE " in query else ""
        assert qualifies(where.split(" GROUP BY ")[0], "d"), query


@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.second
def test_doctor_names_the_partitioning_and_opens_its_read_session_with_the_predicate(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource,
) -> None:
    from blocks.resources import resolve_resources
    from tasks import doctor
    from tasks.registry import list_entries

    data = events(6)
    ref = partitioned_events(source, data)
    register_table(pg, registry, "events", {"source": "events", "key": ["id"], "cursor": "updated_at"})
    (entry,) = list_entries(pg, registry)
    with PartitionFilterRequired({ref: "d"}) as standin:
        standin.register(ref, data)
        res = resolve_resources(env.model_copy(update={"bigquery_storage_endpoint": standin.target}))
        by = {c["name"]: doctor.line(c) for c in doctor.source_checks(res, entry)}
    name = f"{registry}.events"
    assert by[f"source {name}"] == (f"OK      source {name}: {ref} is a TABLE, 6 rows, partitioned by d, a partition"
                                    " filter required (every read carries one)")
    assert by[f"read session {name}"] == f"OK      read session {name}: opened (1 stream(s))"
    assert standin.sessions[-1].row_restriction == DATE_FILTER


@pytest.mark.once
@pytest.mark.second
def test_tables_add_refuses_a_pseudo_column_cursor_in_one_line(env: Settings, registry: str) -> None:
    """Through the real entry point: exit 2, the one line naming the fix, nothing registered."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = subprocess.run([sys.executable, "-m", "flows.cli", "tables", "add", "events", "--source", "events",
                           "--key", "id", "--cursor", "_PARTITIONTIME", "--no-check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {registry}.events: invalid sync parameters: ") and lines[0].endswith(
        "(--query 'SELECT *, _PARTITIONTIME AS partition_time FROM ...' with cursor partition_time)"), lines


@pytest.mark.emulator
@pytest.mark.once
@pytest.mark.second
def test_verify_reads_a_table_that_requires_a_partition_filter_with_one(
    env: Settings, pg: psycopg.Connection[Any], registry: str, source: BigQuerySource, emulator: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bq-refresh verify's queries over such a table (the slices, the bisection, the rows) each read it through the
    always-true predicate on its partitioning column, and still find a row deleted by hand."""
    from psycopg import sql

    from blocks import resolve_resources
    from flows.refresh_table import refresh_table
    from tasks.registry import get_entry
    from tasks.verify import verify_table
    from tests.bqrecorder import RecordingProxy

    data = events(12)
    partitioned_events(source, data)
    register_table(pg, registry, "events", {"source": "events", "key": ["id"], "mode": "full"})
    assert refresh_table("events")["status"] == "success"
    pg.execute(sql.SQL("DELETE FROM {} WHERE id = 5").format(sql.Identifier(registry, "events")))
    proxy = RecordingProxy(emulator.rest_url)
    try:
        monkeypatch.setenv("BIGQUERY_API_ENDPOINT", proxy.url)
        verdict = verify_table(resolve_resources(Settings()), get_entry(pg, registry, "events"), rows=True)
    finally:
        proxy.close()
    assert verdict.status == "differs" and [(r["key"]["id"], r["kind"]) for r in verdict.rows] == [("5", "missing")]
    over_source = [r.query for r in proxy.jobs() if "`events`" in r.query]
    assert len(over_source) == verdict.bigquery_queries >= 2, over_source
    for query in over_source:
        assert "`events` WHERE (`d` IS NULL OR `d` >=" in query, query
