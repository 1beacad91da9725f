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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import sql

from blocks.resources import Resources
from bq_refresh.errors import AlreadyRunning, RefreshError
from tasks import digest, extract, load
from tasks.locks import table_lock
from tasks.registry import RegistryEntry
from tasks.sqlnames import ident

# BigQuery serves time travel for the dataset's window (7 days by default, 2 at least): an older snapshot is not
# asked for (the source is then read as it is now, and the verdict says so).
TIME_TRAVEL_SAFE = timedelta(days=2) - timedelta(hours=1)


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
    from tasks.sync import _columns  # the one mapping of source columns to target columns

    spec = entry.spec()
    source = extract.resolve_source(res.source, table=entry.name, source_ref=spec.source, query=None)
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


def verify_table(res: Resources, entry: RegistryEntry, *, lock_wait_s: float = 0.0) -> Verdict:
    """Compare one table with its source, slice by slice.

    Raises:
        RefreshError: the source or the target cannot be read (names the table).
    """
    started = time.monotonic()
    settings = res.settings
    spec = entry.spec()
    verdict = Verdict(entry.name, "not_verified")
    if spec.query is not None:
        verdict.notes.append("a query source is not verified yet (tables only)")
        return verdict
    target_schema, target_table = (spec.target.split(".", 1) if spec.target else (entry.table_schema, entry.table_name))
    if spec.shadow:
        target_schema = settings.shadow_schema
    try:
        with table_lock(res.target, entry.name, lock_wait_s):  # no publish between the two sides' reads
            source_rows, target_rows = _read_both(res, entry, target_schema, target_table, verdict)
    except AlreadyRunning:
        verdict.notes.append("a run of the table is active (its lock is held): not verified")
        return verdict
    mine, theirs = digest.slice_digests(source_rows), digest.slice_digests(target_rows)
    differing = digest.differences(mine, theirs)
    verdict.slices = len(mine.keys() | theirs.keys())
    verdict.source_rows = sum(d.rows for d in mine.values())
    verdict.target_rows = sum(d.rows for d in theirs.values())
    verdict.differing = [asdict(d) for d in differing]
    verdict.status = "differs" if differing else "equal"
    if differing and spec.delete_policy.mode == "none" and spec.mode == "incremental" and any(
            d.target_rows > d.source_rows for d in differing):
        verdict.notes.append("the delete policy is none: rows deleted in BigQuery stay in the target by design and"
                             " show as extra target rows")
    verdict.seconds = round(time.monotonic() - started, 3)
    return verdict


def _read_both(res: Resources, entry: RegistryEntry, target_schema: str, target_table: str,
               verdict: Verdict) -> tuple[list[Any], list[Any]]:
    """Both sides' per-slice rows (BigQuery's, PostgreSQL's); fills the verdict's columns, slicing and notes."""
    spec = entry.spec()
    target = ident(target_schema, target_table)
    with res.target.connect(autocommit=True) as conn:
        declared = load.target_columns(conn, target_schema, target_table)
        if not declared:
            raise RefreshError(f"target {target_schema}.{target_table} does not exist", table=entry.name)
        columns, verdict.excluded, source = plan_columns(res, entry, declared)
        verdict.weaker = [c.target_name for c in columns if not c.exact]
        by_source = {c.source_name: c for c in columns}
        window = by_source.get(spec.window_column or "")
        slicing = digest.Slicing(window if window is not None and window.exact else None,
                                 [by_source[k] for k in spec.key])
        verdict.slicing = slicing.label
        snapshot = last_snapshot(conn, res.settings.schema_name, entry)
        soft = (sql.SQL("t.{} IS NULL").format(ident(spec.delete_policy.soft_delete_column))
                if spec.delete_policy.mode == "soft" else None)
        target_rows = conn.execute(digest.pg_query(target, columns, slicing, soft)).fetchall()
    at = ""
    if snapshot is None:
        verdict.notes.append("no successful run recorded its read snapshot: BigQuery read as it is now")
    elif not res.source.honours_read_offset:  # the emulator has no time travel
        verdict.notes.append("the emulator has no time travel: BigQuery read as it is now")
    elif datetime.now(UTC) - snapshot > TIME_TRAVEL_SAFE:
        verdict.notes.append(f"the last run's snapshot ({snapshot.isoformat()}) is older than BigQuery's time"
                             " travel may serve: read as it is now")
    else:
        at = f" FOR SYSTEM_TIME AS OF TIMESTAMP '{snapshot.astimezone(UTC).isoformat()}'"
        verdict.read_as_of = snapshot.isoformat()
    project, dataset, table = source.ref.split(".")
    query = digest.bq_query(f"{extract.bq_ident(project)}.{extract.bq_ident(dataset)}.{extract.bq_ident(table)}{at}",
                            columns, slicing)
    client = res.source.get_bigquery_client()
    retry = extract.short_retry(res.source.timeout_s)
    source_rows = list(client.query(query, retry=retry, job_retry=None).result(timeout=res.source.timeout_s, retry=retry))
    return source_rows, [tuple(r) for r in target_rows]
