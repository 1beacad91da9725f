"""Source kinds: what a BigQuery source is (table, view, query), where it lives, what reading it costs, and the
table its rows are read from.

The Storage Read API reads what BigQuery stores: tables, table snapshots and BigLake tables; its overview page
(cloud.google.com/bigquery/docs/reference/storage, "Limitations") sends logical and materialized views through a
query whose result table is then read, and views store no data (cloud.google.com/bigquery/docs/views-intro). So
a VIEW, a MATERIALIZED_VIEW or a non-BigLake EXTERNAL table is read through a query job, as a query source is.
Google's own client reads a query's result that way: ``QueryJob.to_arrow`` with a Storage client opens a read
session on ``job.destination``, the job's anonymous result table, with no snapshot modifier (google-cloud-bigquery
table.py ``RowIterator.to_arrow_iterable`` -> _pandas_helpers.py ``_download_table_bqstorage``). That table needs
no write right: only the job's creator reads it, for up to 24 hours (cloud.google.com/bigquery/docs/writing-results,
"Temporary and permanent tables"); but a result larger than the maximum response size cannot stay in it
(cloud.google.com/bigquery/docs/cached-results, "Limitations"; "Returning large query results": name a destination
table), and then ``materialization_dataset`` names a dataset of the user's where the result is written.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import google.auth.exceptions
from google.api_core import exceptions as gexc
from google.cloud import bigquery

from blocks.bigquery import BigQuerySource
from bq_refresh.errors import OverBudget, SourceError, SourceUnavailable
from tasks.extract import TRANSIENT, SourceTable, _describe, _fields, _first_line, short_retry
from tasks.partitions import partition_filter

Route = Literal["read_session", "query"]
READ_SESSION_TYPES = frozenset({"TABLE", "SNAPSHOT"})  # and BigLake: EXTERNAL with a connection
QUERY_POLL_S = (0.5, 5.0)  # the first and the longest pause between two looks at a running query job


def read_route(table_type: str | None, *, connection: bool) -> Route:
    """How a source of this ``Table.table_type`` is read: a read session on it, or a query job whose result
    table is read. BigLake tables (EXTERNAL with a connection) are readable by the Storage Read API; other
    external tables, logical and materialized views are not."""
    kind = (table_type or "TABLE").upper()
    if kind in READ_SESSION_TYPES or (kind == "EXTERNAL" and connection):
        return "read_session"
    return "query"


def over_budget(table: str, what: str, estimate: int, limit: int | None) -> OverBudget | None:
    """The refusal of a read or query whose BigQuery estimate is over ``limit`` bytes (None: no budget)."""
    if limit is None or estimate <= limit:
        return None
    return OverBudget(f"{what} would scan {estimate:,} bytes in BigQuery, over maximum_bytes_billed {limit:,};"
                      " nothing read", table=table, estimate_bytes=estimate, limit_bytes=limit)


def result_over_budget(table: str, result: SourceTable, estimate: int, limit: int | None) -> OverBudget | None:
    """The refusal of the read of a query job's result table (a query or view source) whose read session estimates
    over ``limit`` bytes. Reading a table through the Storage Read API is billed by the bytes it reads, apart from the
    query (cloud.google.com/bigquery/pricing, "Data extraction pricing": streaming reads), and a result's size is
    known only once its query ran: that query is already billed, and the refusal says so."""
    if limit is None or estimate <= limit:
        return None
    return OverBudget(f"the read of the {result.kind} source's query result {result.ref} would scan {estimate:,} bytes"
                      f" in BigQuery, over maximum_bytes_billed {limit:,}; its query job {result.job_id} already ran"
                      f" ({result.bytes_billed:,} bytes billed), its result is not read", table=table,
                      estimate_bytes=estimate, limit_bytes=limit, query_billed_bytes=result.bytes_billed)


def query_location(source: BigQuerySource, client: bigquery.Client, dataset: str) -> str | None:
    """Where jobs run: the configured location, else the location of ``dataset`` (``project.dataset`` or a
    dataset of the source's project) from its metadata. BigQuery finds a job by id only in its location."""
    if source.location:
        return source.location
    ref = dataset if "." in dataset else f"{source.project_id}.{dataset}"
    location = client.get_dataset(ref, retry=short_retry(source.timeout_s), timeout=source.timeout_s).location
    return str(location) if location else None


def resolve_source(
    source: BigQuerySource, *, table: str, source_ref: str | None, query: str | None,
    materialization_dataset: str | None = None, maximum_bytes_billed: int | None = None, dry_run: bool = False,
) -> SourceTable:
    """Find the source and the table its rows are read from: the table itself, or a query job's result table
    (a query source, or a view or external table that no read session can read).

    Args:
        materialization_dataset: a dataset of the user's where query results are written (a named table),
            instead of the job's anonymous result table.
        maximum_bytes_billed: a query whose dry-run estimate is above this is refused before it runs, and BigQuery
            fails it too above this (JobConfigurationQuery.maximumBytesBilled).
        dry_run: also estimate a query that has no budget (bq-refresh run --dry-run reports it).

    Raises:
        SourceError: the source does not exist, the query fails, or its result needs a materialization_dataset.
        OverBudget: the query's estimate is over ``maximum_bytes_billed``.
        SourceUnavailable: BigQuery did not answer.
    """
    client = source.get_bigquery_client()
    retry = short_retry(source.timeout_s)
    with bigquery_errors(table, source_ref or "of the query"):
        if query is None:
            assert source_ref is not None
            ref = source.table_ref(source_ref)
            bq_table = client.get_table(ref, retry=retry, timeout=source.timeout_s)
            kind = (bq_table.table_type or "TABLE").upper()
            external = bq_table.external_data_configuration
            if read_route(kind, connection=bool(external is not None and external.connection_id)) == "read_session":
                return _described(ref, bq_table, source)
            query = f"SELECT * FROM `{ref}`"  # noqa: S608 - a table reference from the registry, quoted whole
            origin = kind.lower()
            dataset = ref.rsplit(".", 1)[0]
        else:
            origin, dataset = "query", source.dataset  # where the data is; the result must be written there too
        return _materialize(source, client, table=table, query=query, origin=origin, dataset=dataset,
                            materialization_dataset=materialization_dataset, limit=maximum_bytes_billed,
                            estimate=dry_run or maximum_bytes_billed is not None)


def describe_source(source: BigQuerySource, *, table: str, source_ref: str) -> SourceTable:
    """The source object itself, whatever its kind (no query run): for SQL over it (bq-refresh verify).

    Raises:
        SourceError, SourceUnavailable: as resolve_source.
    """
    client = source.get_bigquery_client()
    with bigquery_errors(table, source_ref):
        ref = source.table_ref(source_ref)
        return _described(ref, client.get_table(ref, retry=short_retry(source.timeout_s), timeout=source.timeout_s),
                          source)


def describe_query(source: BigQuerySource, *, table: str, query: str) -> SourceTable:
    """A query source's result as its dry run describes it (the schema, the location; nothing run, nothing
    billed): for SQL over the query itself (bq-refresh verify). ``ref`` is the parenthesized query.

    Raises:
        SourceError, SourceUnavailable: as resolve_source (a query BigQuery rejects names the table).
    """
    client = source.get_bigquery_client()
    with bigquery_errors(table, "of the query"):
        location = query_location(source, client, source.dataset)
        dry = client.query(query, job_config=bigquery.QueryJobConfig(dry_run=True, use_query_cache=False),
                           location=location, retry=short_retry(source.timeout_s), job_retry=None)
        # On lines of its own, a final ';' dropped: a trailing comment or semicolon would end the parentheses.
        body = query.rstrip().rstrip(";").rstrip()
        return SourceTable(f"(\n{body}\n)", _fields(dry.schema or []), kind="query", location=location,
                           bytes_estimated=int(dry.total_bytes_processed or 0))


def _described(ref: str, bq_table: bigquery.Table, source: BigQuerySource) -> SourceTable:
    fields = _fields(bq_table.schema)
    return SourceTable(ref, fields, num_rows=int(bq_table.num_rows or 0),
                       num_bytes=int(bq_table.num_bytes or 0), kind=(bq_table.table_type or "TABLE").lower(),
                       location=bq_table.location or source.location,
                       partition_filter=partition_filter(bq_table, {f.name: f.type for f in fields}))


@contextmanager
def bigquery_errors(table: str, what: str) -> Iterator[None]:
    """BigQuery's and the credentials' errors as ours: SourceError (permanent) or SourceUnavailable (transient)."""
    try:
        yield
    except (SourceError, OverBudget, SourceUnavailable):
        raise
    except gexc.NotFound:
        raise SourceError(f"source table {what} not found in BigQuery", table=table) from None
    except gexc.Forbidden as exc:
        raise SourceError(f"permission denied reading the source: {exc.message}", table=table) from None
    except gexc.Unauthorized as exc:
        raise SourceError(f"BigQuery rejected the credentials: {exc.message}", table=table) from None
    except google.auth.exceptions.RefreshError as exc:
        raise SourceError(f"BigQuery credentials rejected (token refresh failed: {_first_line(exc)})",
                          table=table) from None
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise SourceError(f"no usable BigQuery credentials: {_first_line(exc)}", table=table) from None
    except gexc.BadRequest as exc:
        raise SourceError(f"BigQuery rejected the request: {exc.message}", table=table) from None
    except TRANSIENT as exc:
        raise SourceUnavailable(f"BigQuery unavailable: {_describe(exc)}", table=table) from None
    except OSError as exc:
        raise SourceUnavailable(f"BigQuery unreachable: {exc}", table=table) from None


def result_table_name(table: str) -> str:
    """The named result table of a table's query (in the materialization dataset, or the emulator's dataset)."""
    return f"_bqr_query_{uuid.uuid5(uuid.NAMESPACE_URL, table).hex[:16]}"


def _materialize(source: BigQuerySource, client: bigquery.Client, *, table: str, query: str, origin: str,
                 dataset: str, materialization_dataset: str | None, limit: int | None, estimate: bool) -> SourceTable:
    """Run ``query`` and describe its result table; refuse it first when its dry run is over ``limit``."""
    retry = short_retry(source.timeout_s)
    location = query_location(source, client, dataset)
    estimated = 0
    if estimate:
        dry = client.query(query, job_config=bigquery.QueryJobConfig(dry_run=True, use_query_cache=False),
                           location=location, retry=retry, job_retry=None)
        estimated = int(dry.total_bytes_processed or 0)
        # BigQuery enforces maximumBytesBilled itself; the emulator does not, so the estimate is refused here too.
        refusal = over_budget(table, f"the {origin} source's query", estimated, limit)
        if refusal is not None:
            raise refusal
    config = bigquery.QueryJobConfig(maximum_bytes_billed=limit)
    if materialization_dataset is not None:
        _check_same_location(source, client, table, named_dataset(source, materialization_dataset), location)
    query, named = _statement(source, table, query, materialization_dataset)
    if named is not None and source.reads_query_results:
        config.destination = named
        config.write_disposition = bigquery.WriteDisposition.WRITE_TRUNCATE
    job = None
    try:
        job = client.query(query, job_config=config, location=location, retry=retry, job_retry=None)
        wait_for_job(source, job, table=table, what=f"the {origin} source's query job")
    except gexc.GoogleAPICallError as exc:
        if limit is not None and "bytesBilledLimitExceeded" in _reasons(exc):  # BigQuery's own refusal, unbilled
            raise OverBudget(f"the {origin} source's query would bill more than maximum_bytes_billed {limit:,}"
                             f" (BigQuery: bytesBilledLimitExceeded; its dry run estimated {estimated:,} bytes);"
                             " nothing read", table=table, estimate_bytes=estimated, limit_bytes=limit) from None
        if _too_large(exc):
            raise SourceError(f"the {origin} source's result is too large for an anonymous result table"
                              " (BigQuery: responseTooLarge); set materialization_dataset to a dataset in"
                              f" {location or 'the source location'} where the refresh may write its result"
                              " (roles/bigquery.dataEditor on that dataset only)", table=table) from None
        raise
    except BaseException:  # a timeout or an interruption: the job would run (and bill) on without us
        if job is not None:
            _cancel(client, job, location)
        raise
    destination = named or (str(job.destination) if job.destination is not None else None)
    if destination is None:
        raise SourceError(f"the {origin} source's query job {job.job_id} wrote no result table", table=table)
    bq_table = client.get_table(destination, retry=retry, timeout=source.timeout_s)
    return SourceTable(destination, _fields(bq_table.schema), job.job_id, int(bq_table.num_rows or 0),
                       int(bq_table.num_bytes or 0), kind=origin, job_result=True, location=location,
                       bytes_processed=int(job.total_bytes_processed or 0),
                       bytes_billed=int(job.total_bytes_billed or 0), bytes_estimated=estimated,
                       read_at=job.started or job.created)


class JobTimedOut(SourceError):
    """A query job ran past its limit (BIGQUERY_QUERY_TIMEOUT_SECONDS, or the caller's own)."""


def wait_for_job(source: BigQuerySource, job: bigquery.QueryJob, *, table: str, what: str,
                 limit_s: float | None = None) -> None:
    """Wait for ``job`` to finish, and raise its error if it failed.

    A running job is not a BigQuery that gives no answer: each look at it (jobs.get) is one request, tried within
    BIGQUERY_TIMEOUT_SECONDS, while the job itself may run up to ``source.query_timeout_s``
    (BIGQUERY_QUERY_TIMEOUT_SECONDS). ``QueryJob.result(timeout=...)`` would cap the whole wait instead (a healthy
    61-second query failed against the default 60).

    Raises:
        JobTimedOut: the job ran past ``query_timeout_s`` or ``limit_s`` (the caller cancels it in its location).
    """
    retry = short_retry(source.timeout_s)
    deadline = time.monotonic() + (source.query_timeout_s if limit_s is None else limit_s)
    pause = QUERY_POLL_S[0]
    while not job.done(retry=retry, timeout=source.timeout_s):
        left = deadline - time.monotonic()
        if left <= 0:  # the caller cancels it, as after any error or interruption
            if limit_s is not None:
                raise JobTimedOut(f"{what} {job.job_id} ran longer than {limit_s:g} s and was cancelled", table=table)
            raise JobTimedOut(f"{what} {job.job_id} ran longer than"
                              f" BIGQUERY_QUERY_TIMEOUT_SECONDS ({source.query_timeout_s:g} s) and was cancelled;"
                              " raise it, or make the query cheaper", table=table)
        time.sleep(min(pause, left))
        pause = min(pause * 2, QUERY_POLL_S[1])
    job.result(retry=retry, timeout=source.timeout_s)  # done: raises the job's own error, waits for nothing


def query_rows(source: BigQuerySource, query: str, *, table: str, what: str,
               job_config: bigquery.QueryJobConfig | None = None,
               limit_s: float | None = None) -> tuple[bigquery.QueryJob, list[tuple[Any, ...]]]:
    """Run one query of ours (the reconciliation's counts, the checks' counts, verify's digests) and return the job
    and its rows: waited for as ``wait_for_job`` does (a job that runs is not a BigQuery that gives no answer), and
    cancelled where it runs on any error or interruption."""
    client = source.get_bigquery_client()
    retry = short_retry(source.timeout_s)
    job = client.query(query, job_config=job_config, retry=retry, job_retry=None)
    try:
        wait_for_job(source, job, table=table, what=what, limit_s=limit_s)
        return job, [tuple(r) for r in job.result(retry=retry, timeout=source.timeout_s)]
    except BaseException:
        try:
            client.cancel_job(job.job_id, location=job.location, retry=retry, timeout=source.timeout_s)
        except Exception:  # noqa: BLE001, S110 - the job's own error is the one to raise
            pass
        raise


def named_dataset(source: BigQuerySource, dataset: str) -> str:
    """``dataset`` or ``project.dataset`` as ``project.dataset``."""
    return dataset if "." in dataset else f"{source.project_id}.{dataset}"


def _statement(source: BigQuerySource, table: str, query: str,
               materialization_dataset: str | None) -> tuple[str, str | None]:
    """The statement a table's query runs as, and the named table its result goes to (None: the job's own)."""
    named = (f"{named_dataset(source, materialization_dataset)}.{result_table_name(table)}"
             if materialization_dataset is not None else None)
    if not source.reads_query_results:
        # The emulator's Storage Read API cannot read a job's result table, nor does it write a query's
        # destination: the result goes into a named table by DDL, readable there like any table.
        named = named or source.table_ref(result_table_name(table))
        return f"CREATE OR REPLACE TABLE `{named}` AS {query}", named
    return query, named


def earlier_result(
    source: BigQuerySource, *, table: str, source_ref: str | None, query: str | None,
    materialization_dataset: str | None, job_id: str, result_ref: str, location: str | None,
) -> SourceTable | None:
    """The result table of an earlier query job of this table, found by the job's id in its location, when the
    job finished, ran the statement this table's source runs now and its result is still there (an anonymous
    result lasts about 24 hours); None otherwise (the query is run again).

    Raises:
        SourceError, SourceUnavailable: as resolve_source.
    """
    client = source.get_bigquery_client()
    retry = short_retry(source.timeout_s)
    text = query if query is not None else f"SELECT * FROM `{source.table_ref(str(source_ref))}`"  # noqa: S608
    statement, _ = _statement(source, table, text, materialization_dataset)
    with bigquery_errors(table, result_ref):
        try:
            job = client.get_job(job_id, location=location, retry=retry, timeout=source.timeout_s)
            if job.state != "DONE" or job.error_result or getattr(job, "query", None) != statement:
                return None
            bq_table = client.get_table(result_ref, retry=retry, timeout=source.timeout_s)
        except gexc.NotFound:
            return None
    return SourceTable(result_ref, _fields(bq_table.schema), job_id, int(bq_table.num_rows or 0),
                       int(bq_table.num_bytes or 0), kind="query" if query is not None else "view", job_result=True,
                       location=location, read_at=job.started or job.created, reused=True)


def _reasons(exc: gexc.GoogleAPICallError) -> set[str]:
    return {str(e.get("reason")) for e in (exc.errors or []) if isinstance(e, dict)}


def _too_large(exc: gexc.GoogleAPICallError) -> bool:
    return "responseTooLarge" in _reasons(exc) or "response too large" in str(exc.message).lower()


def _cancel(client: bigquery.Client, job: Any, location: str | None) -> None:
    """Ask BigQuery to stop ``job`` (found by id in its location); a failure to cancel is not the error."""
    try:
        client.cancel_job(job.job_id, location=location or job.location, timeout=10)
    except Exception:  # noqa: BLE001, S110 - best effort: the job's own error is the one reported
        pass


def _check_same_location(source: BigQuerySource, client: bigquery.Client, table: str, dataset: str,
                         location: str | None) -> None:
    """A query writes its destination only in its own location: refuse a materialization dataset elsewhere."""
    try:
        found = client.get_dataset(dataset, retry=short_retry(source.timeout_s), timeout=source.timeout_s).location
    except gexc.NotFound:
        raise SourceError(f"materialization_dataset {dataset} not found in BigQuery: create it in"
                          f" {location or 'the source location'}", table=table) from None
    if location and found and str(found).upper() != location.upper():
        raise SourceError(f"materialization_dataset {dataset} is in {found}, the source's query runs in {location}:"
                          " use a dataset in the same location", table=table)


def cost_line(figures: dict[str, int]) -> str:
    """One line of what a run reads and bills in BigQuery (an audit row's ``bigquery_bytes``), for --dry-run."""
    parts = [f"read session estimate {figures.get('read_estimated', 0):,} bytes"]
    if "query_processed" in figures:
        parts.append(f"query {figures.get('query_estimated', 0):,} bytes estimated (dry run),"
                     f" {figures['query_processed']:,} processed, {figures.get('query_billed', 0):,} billed")
    return "BigQuery: " + "; ".join(parts)


def keeps_history(kind: str) -> bool:
    """Whether ``FOR SYSTEM_TIME AS OF`` reads a source's past data: a table's does; on a logical view it picks the
    view's past definition and runs it over today's data, and materialized views and external tables keep none."""
    return kind == "table"
