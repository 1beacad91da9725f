"""Verify: does the live table still equal its BigQuery source? Per slice (tasks/digest.py), a row count and a
digest computed on each side where the data lives; only the digests cross the wire.

The source is read as of the last successful run's read snapshot (its audit row's ``data_as_of``) where BigQuery
has time travel, so rows that arrived since are not reported; the emulator has none and is read as it is now (the
verdict says so). The table's lock is held while both sides are read, so no publish runs in between; a table
whose run is active is not verified (the verdict says so). Soft-deleted rows are left out; columns a transform
makes or may change are left out and listed; the weaker columns (digest.WEAK_TYPES) are compared by their count
of non-NULL values, and listed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from blocks.resources import Resources
from bq_refresh.errors import AlreadyRunning, RefreshError
from tasks import digest, extract, load, reconcile
from tasks.locks import table_lock
from tasks.registry import RegistryEntry
from tasks.sources import JobTimedOut, describe_query, describe_source, keeps_history, query_rows
from tasks.sqlnames import ident


def read_as_of(snapshot: datetime | None, now: datetime, *, time_travel: bool,
               window_hours: Callable[[], int]) -> tuple[datetime | None, str | None]:
    """Which BigQuery snapshot verify reads: the last night's, where BigQuery can still serve it (inside the
    dataset's time travel window, max_time_travel_hours, less the margin extract.snapshot_out_of_reach keeps; the
    window is asked for only when the snapshot is older than the shortest window BigQuery allows), else the table as
    it is now, with the note saying why. ``time_travel``: the endpoint has it (BigQuery; not the emulator)."""
    if snapshot is None:
        return None, "no successful run recorded its read snapshot: BigQuery read as it is now"
    if not time_travel:
        return None, "the emulator has no time travel: BigQuery read as it is now"
    if extract.snapshot_out_of_reach(snapshot, now, extract.MIN_TIME_TRAVEL_HOURS) is None:
        return snapshot, None
    hours = window_hours()
    if extract.snapshot_out_of_reach(snapshot, now, hours) is None:
        return snapshot, None
    return None, (f"the last run's snapshot ({snapshot.isoformat()}) is older than BigQuery's time travel serves"
                  f" (the dataset's max_time_travel_hours is {hours}): read as it is now; rows changed since that run"
                  " show as differences")


class TimedOut(RefreshError):
    """Verify of one table ran past its deadline (REFRESH_VERIFY_TIMEOUT_SECONDS or the table's
    verify_timeout_seconds); both sides' queries were cancelled."""


@dataclass
class Verdict:
    """One table's answer."""

    table: str
    status: str  # equal, differs, not_verified
    slicing: str = ""
    slices: int = 0
    source_rows: int = 0
    target_rows: int = 0
    differing: list[dict[str, Any]] = field(default_factory=list)
    weaker: list[str] = field(default_factory=list)  # compared by non-NULL counts only
    excluded: list[str] = field(default_factory=list)  # not compared (derived or transformed)
    read_as_of: str | None = None  # the BigQuery snapshot read (None: as it is now)
    rows: list[dict[str, Any]] = field(default_factory=list)  # with --rows: the differing rows (digest.RowDifference)
    repair: dict[str, Any] | None = None  # with --repair: the repairing run (status, periods, rows, audit id)
    kept_deleted: list[dict[str, Any]] = field(default_factory=list)  # delete policy none: target-only keys (info)
    bigquery_queries: int = 0
    bytes_processed: int = 0  # by BigQuery, all of verify's queries (the emulator reports 0)
    bytes_billed: int = 0  # the slices' query, and with --rows one per bisection step and one for the rows
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def last_snapshot(conn: Any, registry_schema: str, entry: RegistryEntry) -> datetime | None:
    """The read snapshot of the table's last successful (not dry) run."""
    row = conn.execute(sql.SQL(
        "SELECT (sync_metadata->>'data_as_of')::timestamptz FROM {} WHERE table_schema = %s AND table_name = %s"
        " AND status IN ('success', 'warning') AND NOT coalesce((sync_metadata->>'dry_run')::boolean, false)"
        " AND sync_metadata ? 'data_as_of' ORDER BY id DESC LIMIT 1").format(ident(registry_schema, "refresh_audit_log")),
        (entry.table_schema, entry.table_name)).fetchone()
    return row[0] if row else None


def plan_columns(res: Resources, entry: RegistryEntry, declared: dict[str, str]) -> tuple[
        list[digest.DigestColumn], list[str], extract.SourceTable]:
    """The columns both sides hold, as digest columns, and the ones left out (with why)."""
    from tasks.refresh_plan import _columns  # the one mapping of source columns to target columns

    spec = entry.spec()
    source = _described(res, entry)
    columns = _columns(spec, source, entry.name)
    key = {spec.target_name(k) for k in spec.key}
    chosen, excluded = [], []
    for c in columns:
        if c.derived:
            excluded.append(f"{c.target_name} (made by transform {spec.transform})")
        elif spec.transform and c.target_name not in key and c.source_name != spec.window_column:
            excluded.append(f"{c.target_name} (transform {spec.transform} may change it)")
        elif c.target_name not in declared:
            excluded.append(f"{c.target_name} (not in the target)")
        else:
            zone = (spec.target_timezone if c.bq_type == "TIMESTAMP" and declared[c.target_name]
                    == "timestamp without time zone" else None)
            chosen.append(digest.DigestColumn(c.source_name, c.target_name, c.bq_type, c.mode == "REPEATED", zone))
    return chosen, excluded, source


class OverBudget(RefreshError):
    """A verify query's BigQuery estimate is over the budget given."""


@dataclass
class _Sides:
    """What both sides' queries need: the columns, the slicing, where each side's rows are read."""

    columns: list[digest.DigestColumn]
    slicing: digest.Slicing
    source_from: str  # BigQuery table reference, with FOR SYSTEM_TIME AS OF where it applies
    target: sql.Composable
    where: sql.Composable | None  # soft-deleted rows left out
    res: Resources
    max_bytes: int | None = None  # per BigQuery query: refused beforehand above it, and BigQuery's own limit
    deadline: float | None = None  # time.monotonic() past which no query runs (each is cancelled at it)
    timeout_s: float | None = None  # the limit the deadline came from (for the message)
    table: str = ""  # the registry name (errors name it)
    queries: int = 0  # BigQuery queries run
    bytes_processed: int = 0
    bytes_billed: int = 0

    def bigquery(self, query: str) -> list[Any]:
        """Run one of verify's BigQuery queries: with a budget, a dry run first (its estimate over the budget:
        refused, nothing run), then the query with maximumBytesBilled set, so BigQuery itself fails a query that
        would bill more, without charge (cloud.google.com/bigquery/docs/reference/rest/v2/Job, JobConfigurationQuery)."""
        from google.cloud import bigquery

        client = self.res.source.get_bigquery_client()
        retry = extract.short_retry(self.res.source.timeout_s)
        if self.max_bytes is not None:
            dry = client.query(query, job_config=bigquery.QueryJobConfig(dry_run=True, use_query_cache=False),
                               retry=retry, job_retry=None)
            estimate = int(dry.total_bytes_processed or 0)
            if estimate > self.max_bytes:
                raise OverBudget(f"verify would scan {estimate} bytes in BigQuery in one query, over the budget of"
                                 f" {self.max_bytes} (--max-bytes): nothing run")
        self.queries += 1
        left = self.left()
        try:  # waited for while it runs, up to the table's deadline; cancelled where it runs past it
            job, rows = query_rows(self.res.source, query, table=self.table, what="verify's query",
                                   job_config=bigquery.QueryJobConfig(maximum_bytes_billed=self.max_bytes),
                                   limit_s=left)
        except JobTimedOut:
            if left is None:
                raise
            raise TimedOut(f"verify ran past its {self.timeout_label()}: BigQuery's query cancelled") from None
        self.bytes_processed += int(job.total_bytes_processed or 0)
        self.bytes_billed += int(job.total_bytes_billed or 0)
        return rows

    def postgres(self, query: sql.Composed) -> list[Any]:
        left = self.left()
        with self.res.target.connect(autocommit=True) as conn:
            try:
                with conn.transaction():  # SET LOCAL: the limit ends with it, whatever pooler holds the session
                    if left is not None:
                        conn.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(
                            sql.Literal(max(1, int(left * 1000)))))
                    return [tuple(r) for r in conn.execute(query).fetchall()]
            except psycopg.errors.QueryCanceled:
                if left is None:
                    raise
                raise TimedOut(f"verify ran past its {self.timeout_label()}: PostgreSQL's query cancelled") from None

    def left(self) -> float | None:
        """Seconds left before the deadline (None: no deadline); past it, TimedOut."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimedOut(f"verify ran past its {self.timeout_label()}")
        return left

    def timeout_label(self) -> str:
        return (f"timeout of {self.timeout_s or 0:g} s (REFRESH_VERIFY_TIMEOUT_SECONDS, or the table's"
                " verify_timeout_seconds)")

    def source_side(self) -> digest.BigQuerySide:
        return digest.BigQuerySide(self.source_from, self.bigquery)

    def target_side(self) -> digest.PostgresSide:
        return digest.PostgresSide(self.target, self.postgres, self.where)


def verify_table(res: Resources, entry: RegistryEntry, *, rows: bool = False, max_bytes: int | None = None,
                 lock_wait_s: float = 0.0, timeout_s: float | None = None) -> Verdict:
    """Compare one table with its source, slice by slice (and, with ``rows``, bisect each differing slice down to
    the rows that differ), holding the table's lock throughout.

    ``timeout_s`` (default: the table's verify_timeout_seconds, else REFRESH_VERIFY_TIMEOUT_SECONDS; 0: none): past
    it the queries on both sides are cancelled and the table is not verified (the verdict says so).

    Raises:
        RefreshError: the source or the target cannot be read (names the table).
    """
    started = time.monotonic()
    spec = entry.spec()
    verdict = Verdict(entry.name, "not_verified")
    try:
        with table_lock(res.target, entry.name, lock_wait_s):  # no publish between the two sides' reads
            sides = _sides(res, entry, verdict)
            sides.max_bytes = max_bytes
            limit = timeout_s if timeout_s is not None else (spec.verify_timeout_seconds
                                                             or res.settings.verify_timeout_s)
            if limit:
                sides.timeout_s, sides.deadline = limit, started + limit
            compared = digest.compare_slices(sides.source_side(), sides.target_side(), sides.columns, sides.slicing)
            mine, theirs, differing = compared.source, compared.target, compared.differing
            keeps_deleted = spec.delete_policy.mode == "none" and spec.mode == "incremental"
            if (rows or keeps_deleted) and differing:
                found = digest.locate_rows(sides.source_side(), sides.target_side(), sides.columns, sides.slicing,
                                           differing, verdict.notes)
                if keeps_deleted and len(differing) <= MAX_SLICES_BISECTED and len(found) <= MAX_ROWS_LISTED:
                    # Rows deleted in BigQuery stay here by design: a slice whose only differences are target-only
                    # keys is equal (they are listed as information); anything else still differs.
                    kept = [r for r in found if r.kind == "extra"]
                    mended = {r.slice for r in found if r.kind != "extra"}
                    differing = [d for d in differing if d.slice in mended or not any(r.slice == d.slice for r in kept)]
                    verdict.kept_deleted = [asdict(r) for r in kept]
                    found = [r for r in found if r.kind != "extra"]
                verdict.rows = [asdict(r) for r in found] if rows else []
            verdict.bigquery_queries = sides.queries
            verdict.bytes_processed, verdict.bytes_billed = sides.bytes_processed, sides.bytes_billed
    except AlreadyRunning:
        verdict.notes.append("a run of the table is active (its lock is held): not verified")
        return verdict
    except (OverBudget, TimedOut) as exc:
        verdict.notes.append(str(exc))
        return verdict
    verdict.slices = len(mine.keys() | theirs.keys())
    verdict.source_rows = sum(d.rows for d in mine.values())
    verdict.target_rows = sum(d.rows for d in theirs.values())
    verdict.differing = [asdict(d) for d in differing]
    verdict.status = "differs" if differing else "equal"
    if verdict.kept_deleted:
        verdict.notes.append(f"{len(verdict.kept_deleted)} key(s) here only, kept by design (delete policy none: rows"
                             " deleted in BigQuery stay): listed as information")
    verdict.seconds = round(time.monotonic() - started, 3)
    return verdict


def period_of(slice_text: str | None, window: digest.DigestColumn) -> str | None:
    """A window slice's canonical text as the period text of reconcile.period_text (what a run replaces)."""
    if slice_text is None or window.bq_type not in {"TIMESTAMP", "DATETIME"}:
        return slice_text
    at = datetime(1970, 1, 1) + timedelta(microseconds=int(slice_text))
    return reconcile.period_text(at.replace(tzinfo=UTC) if window.bq_type == "TIMESTAMP" else at)


def repair_keys(res: Resources, entry: RegistryEntry, verdict: Verdict) -> list[list[str | None]] | None:
    """The keys a repair re-reads one by one, in the key's column order: every differing row verify located, when
    it located all of them (each differing slice bisected, none left out of the list) and they are at most
    REFRESH_REPAIR_MAX_ROWS; else None."""
    spec = entry.spec()
    located = {r["slice"] for r in verdict.rows} | {r["slice"] for r in verdict.kept_deleted}
    complete = (verdict.rows and len(verdict.differing) <= MAX_SLICES_BISECTED and len(verdict.rows) < MAX_ROWS_LISTED
                and all(d["slice"] in located for d in verdict.differing))
    if not complete or len(verdict.rows) > res.settings.repair_max_rows:
        return None
    source = _described(res, entry)
    key = [digest.DigestColumn(k, spec.target_name(k), f.type) for k in spec.key if (f := source.field(k)) is not None]
    keys = [[r["key"][c.target_name] for c in key] for r in verdict.rows]
    if len(key) != len(spec.key) or digest.key_restriction(key, keys) is None:
        return None  # a key column whose values have no simple literal (NUMERIC, BOOL, ...)
    return keys


def repair_table(res: Resources, entry: RegistryEntry, verdict: Verdict, run_table: Callable[..., dict[str, Any]]
                 ) -> dict[str, Any]:
    """Reload what differs through the normal run (plan, gate, publish with its reconciliation and delete guard,
    audit, alerts), at one snapshot. Rows verify located (``verdict.rows``, up to REFRESH_REPAIR_MAX_ROWS) are
    re-read by key through a read session whose row restriction names them, and exactly those keys replaced;
    otherwise a window-mode table re-reads exactly its differing periods whole, every row staged (no hash skip: a
    hand edit leaves the old hash), and any other table runs a full refresh (rows already equal are not rewritten).
    A repair leaves the watermark, the refresh time and the table's freshness as the nights left them.

    Args:
        run_table: the run itself (flows.refresh_table.refresh_table: the flow, above this module), called with
            the table's name and ``repair_keys``, ``repair_periods`` or ``full_refresh``, and ``refresh_views``.

    Returns:
        The run's summary, with ``repaired``: "N rows by key", the periods, or "full refresh".
    """
    spec = entry.spec()
    keys = repair_keys(res, entry, verdict)
    if keys is not None:
        run = run_table(entry.name, repair_keys=keys, refresh_views=True)
        return {**run, "repaired": f"{len(keys)} rows by key"}
    window = next((c for c in _window_columns(res, entry) if c.source_name == spec.window_column), None)
    if spec.mode == "window" and window is not None and verdict.slicing == window.target_name:
        periods = [period_of(d["slice"], window) for d in verdict.differing]
        run = run_table(entry.name, repair_periods=periods, refresh_views=True)
        return {**run, "repaired": periods}
    run = run_table(entry.name, full_refresh=True, refresh_views=True)
    return {**run, "repaired": "full refresh"}


def _window_columns(res: Resources, entry: RegistryEntry) -> list[digest.DigestColumn]:
    spec = entry.spec()
    if not spec.window_column:
        return []
    source = _described(res, entry)
    field_ = source.field(spec.window_column)
    return [digest.DigestColumn(spec.window_column, spec.target_name(spec.window_column), field_.type)] if field_ else []


MAX_SLICES_BISECTED, MAX_ROWS_LISTED = digest.MAX_SLICES_BISECTED, digest.MAX_ROWS_LISTED


def _described(res: Resources, entry: RegistryEntry) -> extract.SourceTable:
    """The source table, or a query source's result as its dry run describes it (``ref`` the query in parentheses)."""
    spec = entry.spec()
    if spec.query is not None:
        return describe_query(res.source, table=entry.name, query=spec.query)
    return describe_source(res.source, table=entry.name, source_ref=str(spec.source))


def _sides(res: Resources, entry: RegistryEntry, verdict: Verdict) -> _Sides:
    """Both sides' columns, slicing and read places; fills the verdict's columns, slicing and notes."""
    spec = entry.spec()
    target_schema, target_table = (spec.target.split(".", 1) if spec.target else (entry.table_schema, entry.table_name))
    if spec.shadow:
        target_schema = res.settings.shadow_schema
    with res.target.connect(autocommit=True) as conn:
        declared = load.target_columns(conn, target_schema, target_table)
        if not declared:
            raise RefreshError(f"target {target_schema}.{target_table} does not exist", table=entry.name)
        columns, verdict.excluded, source = plan_columns(res, entry, declared)
        snapshot = last_snapshot(conn, res.settings.schema_name, entry)
    verdict.weaker = [c.target_name for c in columns if not c.exact]
    by_source = {c.source_name: c for c in columns}
    window = by_source.get(spec.window_column or "")
    slicing = digest.Slicing(window if window is not None and window.exact else None, [by_source[k] for k in spec.key])
    verdict.slicing = slicing.label
    at = ""
    as_of: datetime | None
    note: str | None
    if source.kind == "query":  # no table to ask its time travel window of (and no past to read)
        as_of, note = None, "a query source has no past to read: its query run as it is now"
    else:
        as_of, note = read_as_of(snapshot, datetime.now(UTC), time_travel=res.source.time_travel,
                                 window_hours=lambda: extract.time_travel_hours(res.source, source.ref))
    if as_of is not None and not keeps_history(source.kind):
        as_of, note = None, f"{source.ref} is a {source.kind.replace('_', ' ')}: it has no past to read, read as it is now"
    if note:
        verdict.notes.append(note)
    if as_of is not None:
        at = f" FOR SYSTEM_TIME AS OF TIMESTAMP '{as_of.astimezone(UTC).isoformat()}'"
        verdict.read_as_of = as_of.isoformat()
    soft = (sql.SQL("t.{} IS NULL").format(ident(spec.delete_policy.soft_delete_column))
            if spec.delete_policy.mode == "soft" else None)
    if source.kind == "query":
        source_from = source.ref  # the query itself, in parentheses
    else:
        project, dataset, table = source.ref.split(".")
        source_from = f"{extract.bq_ident(project)}.{extract.bq_ident(dataset)}.{extract.bq_ident(table)}{at}"
    if source.partition_filter:  # require_partition_filter: BigQuery refuses a query over the table without one
        source_from = f"(SELECT * FROM {source_from} WHERE {source.partition_filter})"  # noqa: S608 - ours
    return _Sides(columns, slicing, source_from, ident(target_schema, target_table), soft, res, table=entry.name)
