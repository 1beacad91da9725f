"""The quality gate: checks on staged data before publishing, and on the live table inside the publish."""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import sql

from blocks.resources import Resources
from bq_refresh.errors import QualityCheckFailed
from tasks import rowhash
from tasks.extract import bq_ident
from tasks.restriction import Restriction, query_where
from tasks.spec import QualityConfig
from tasks.sqlnames import ident, idents, quote_ident
from tasks.typemap import Column

MOD = 2**64


@dataclass
class CheckResult:
    """One check's outcome, as written to refresh_data_quality."""

    name: str
    value: float | None
    expected: float | None = None
    minimum: float | None = None
    maximum: float | None = None
    ok: bool = True
    hard: bool = True
    detail: str = ""


def checksum(data: pa.RecordBatch | pa.Table, columns: list[Column], names: list[str]) -> int:
    """Order-independent checksum: the sum, modulo 2**64, of the row hash (tasks/rowhash.py) of each row's
    ``names`` values.

    The same function runs on the Arrow batches read from BigQuery and on the staging table read back
    from PostgreSQL (cast to the same Arrow types), so one changed value in one row changes it.
    """
    if data.num_rows == 0:
        return 0
    by_name = {c.target_name: c for c in columns}
    arrays = []
    for n in names:
        arr = data.column(n)
        want = by_name[n].arrow_type
        arrays.append(arr.cast(want) if arr.type != want else arr)
    hashes = rowhash.row_hashes(arrays).to_numpy(zero_copy_only=False).view(np.uint64)
    return int(np.sum(hashes, dtype=np.uint64))  # wraps modulo 2**64 by design


def checksum_names(columns: list[Column], key: list[str], critical: list[str]) -> list[str]:
    chosen = list(key) + [c for c in critical if c not in key] if critical else [c.target_name for c in columns]
    return [c for c in chosen if any(col.target_name == c for col in columns)]


def source_count(res: Resources, source_ref: str, restriction: Restriction, snapshot: str | None,
                 partition_filter: str = "") -> int:
    """The source's row count for the synced window, from BigQuery (at the read's snapshot on BigQuery): the rows of
    ``restriction`` (its values bound as query parameters) and of the table's partition predicate (from its
    metadata, tasks/partitions.py)."""
    from google.cloud import bigquery

    project, dataset, table = source_ref.split(".")
    at = ""
    if snapshot and res.source.time_travel:  # the emulator has no time travel
        at = f" FOR SYSTEM_TIME AS OF TIMESTAMP '{datetime.fromisoformat(snapshot).isoformat()}'"
    where, params = query_where(restriction)
    if partition_filter:
        where = f"({where}) AND {partition_filter}"
    query = f"SELECT COUNT(*) AS n FROM {bq_ident(project)}.{bq_ident(dataset)}.{bq_ident(table)}{at} WHERE {where}"  # noqa: S608
    from tasks.sources import query_rows

    _, rows = query_rows(res.source, query, table=source_ref, what="the source count query",
                         job_config=bigquery.QueryJobConfig(query_parameters=params))
    return int(rows[0][0])


def staged_checksum(res: Resources, staging_schema: str, staging_table: str, columns: list[Column], names: list[str],
                    adbc_conn: Any = None) -> int:
    """Read the staging table back as Arrow, in batches, and checksum it (on ``adbc_conn``'s open
    transaction when given: a direct load checks its own uncommitted rows)."""
    text = f"SELECT {', '.join(quote_ident(n) for n in names)} FROM {quote_ident(staging_schema)}.{quote_ident(staging_table)}"  # noqa: S608
    conn = adbc_conn or res.target.connect_adbc()
    total = 0
    try:
        with conn.cursor() as cur:
            cur.execute(text)
            for batch in cur.fetch_record_batch():
                total = (total + checksum(batch, columns, names)) % MOD
    finally:
        if adbc_conn is None:
            conn.close()
    return total


def staged_checks(
    res: Resources, *, table: str, target_schema: str, target_table: str, staging_schema: str, staging_table: str,
    columns: list[Column], key: list[str], critical: list[str], config: QualityConfig, source_ref: str,
    restriction: Restriction, snapshot: str | None, stage_state: dict[str, Any], previous_rows: int | None,
    partition_filter: str = "", conn: Any = None, adbc_conn: Any = None, verify_from: str | None = None,
) -> list[CheckResult]:
    """Run every configured check on the staged rows (on ``conn``/``adbc_conn`` when given: the open
    transaction of a direct load, whose "staging" is the target itself; ``verify_from`` is then the query of
    its rows with their kept hashes)."""
    hard = set(config.hard)
    staging = ident(staging_schema, staging_table)
    results: list[CheckResult] = []
    with (nullcontext(conn) if conn is not None else res.target.connect(autocommit=True)) as conn:
        staged_row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(staging)).fetchone()
        staged = int(staged_row[0]) if staged_row else 0
        # rows of the read session (rows read by key for a re-added key are not in its count)
        read = (staged + int(stage_state.get("quarantined", 0)) + int(stage_state.get("unchanged", 0))
                - int(stage_state.get("refetched", 0)))
        if config.row_count:
            expected = source_count(res, source_ref, restriction, snapshot, partition_filter)
            results.append(CheckResult("row_count", read, expected, ok=read == expected, hard="row_count" in hard,
                                       detail=f"rows read {read} (staged {staged}, unchanged"
                                              f" {int(stage_state.get('unchanged', 0))}), source {expected}"))
        if config.checksum and stage_state.get("verify_sample"):
            # Row-hash tables: every value of a deterministic sample of rows is re-hashed from what PostgreSQL
            # stored and compared with the hash computed from the source (and the sample's size with ours).
            from tasks.fastpath import verify_rows

            sample = int(stage_state["verify_sample"])
            conn_ = adbc_conn or res.target.connect_adbc()
            try:
                seen, good = verify_rows(conn_, staging_schema, staging_table, columns, sample, relation=verify_from)
            finally:
                if adbc_conn is None:
                    conn_.close()
            want = int(stage_state.get("checksum", 0))
            results.append(CheckResult("checksum", float(good), float(want), ok=good == want == seen,
                                       hard="checksum" in hard,
                                       detail=f"row hashes re-computed from the stored values: {good} of {seen} rows"
                                              f" read back match, {want} expected (1 row in {sample} verified)"))
        elif config.checksum:
            names = checksum_names(columns, key, critical)
            got = staged_checksum(res, staging_schema, staging_table, columns, names, adbc_conn)
            want = int(stage_state.get("checksum", 0)) % MOD
            results.append(CheckResult("checksum", float(got), float(want), ok=got == want, hard="checksum" in hard,
                                       detail=f"fields {', '.join(names)}"))
        for fk in config.foreign_keys:
            results.append(_orphans(conn, staging, fk.columns, fk.parent, fk.parent_columns or fk.columns,
                                    hard=fk.hard and "foreign_key" in hard, label="staged"))
        for column, limit in config.max_null_rate.items():
            row = conn.execute(sql.SQL("SELECT count(*) FILTER (WHERE {} IS NULL)::float8 / nullif(count(*), 0) FROM {}")
                               .format(ident(column), staging)).fetchone()
            rate = float(row[0]) if row and row[0] is not None else 0.0
            results.append(CheckResult(f"null_rate:{column}", rate, None, 0.0, limit, rate <= limit, "null_rate" in hard))
        for column, (low, high) in config.ranges.items():
            cond = []
            if low is not None:
                cond.append(sql.SQL("{} < {}").format(ident(column), sql.Literal(low)))
            if high is not None:
                cond.append(sql.SQL("{} > {}").format(ident(column), sql.Literal(high)))
            row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
                staging, sql.SQL(" OR ").join(cond) if cond else sql.SQL("false"))).fetchone()
            bad = int(row[0]) if row else 0
            results.append(CheckResult(f"range:{column}", bad, 0, low, high, bad == 0, "range" in hard,
                                       detail=f"{bad} row(s) outside [{low}, {high}]"))
        for a, b in config.not_greater_than:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} > {}").format(staging, ident(a), ident(b))).fetchone()
            bad = int(row[0]) if row else 0
            results.append(CheckResult(f"order:{a}<={b}", bad, 0, ok=bad == 0, hard="order" in hard,
                                       detail=f"{bad} row(s) with {a} > {b}"))
        if config.max_row_count_change is not None and previous_rows:
            change = abs(read - previous_rows) / previous_rows
            results.append(CheckResult("row_count_change", change, None, None, config.max_row_count_change,
                                       change <= config.max_row_count_change, "row_count_change" in hard,
                                       detail=f"{read} rows vs {previous_rows} in the previous run"))
    return results


def _orphans(conn: psycopg.Connection[Any], child: sql.Composable, columns: list[str], parent: str,
             parent_columns: list[str], *, hard: bool, label: str) -> CheckResult:
    p_schema, p_table = parent.split(".", 1)
    match = sql.SQL(" AND ").join(sql.SQL("p.{} = c.{}").format(ident(pc), ident(cc))
                                  for pc, cc in zip(parent_columns, columns, strict=True))
    not_null = sql.SQL(" AND ").join(sql.SQL("c.{} IS NOT NULL").format(ident(c)) for c in columns)
    row = conn.execute(sql.SQL(
        "SELECT count(*) FROM (SELECT DISTINCT {} FROM {}) c WHERE {} AND NOT EXISTS (SELECT 1 FROM {} p WHERE {})"
    ).format(idents(columns), child, not_null, ident(p_schema, p_table), match)).fetchone()
    orphans = int(row[0]) if row else 0
    return CheckResult(f"foreign_key:{','.join(columns)}->{parent}", orphans, 0, ok=orphans == 0, hard=hard,
                       detail=f"{orphans} {label} key(s) without a parent in {parent}")


def published_checks(
    conn: psycopg.Connection[Any], *, target: sql.Composable, staged: sql.Composable, key: list[str],
    distinct_staged: int, config: QualityConfig, hashes: sql.Composable | None = None,
) -> list[CheckResult]:
    """Inside the publish transaction: every staged key is in the live table (and, when the table's row hashes
    are kept, in the side table ``hashes`` with the staged row's hash, so the hash kept is the row read); no
    orphans there.

    Args:
        staged: a query of the staged rows, one per key (the row that was published), with their row hash
            (column ``_bqr_row_hash``) when ``hashes`` is given.
    """
    from tasks.fastpath import HASH_COLUMN

    hard = set(config.hard)
    match = sql.SQL(" AND ").join(sql.SQL("t.{} = s.{}").format(ident(k), ident(k)) for k in key)
    kept: sql.Composable = sql.SQL("")
    if hashes is not None:
        kept = sql.SQL(" AND EXISTS (SELECT 1 FROM {} r WHERE {} AND r.h = s.{})").format(
            hashes, sql.SQL(" AND ").join(sql.SQL("r.{} = s.{}").format(ident(k), ident(k)) for k in key),
            ident(HASH_COLUMN))
    # Driven from the staged keys (a probe of the live table's key index each), not a scan of the live table.
    row = conn.execute(sql.SQL("SELECT count(*) FROM ({}) s WHERE EXISTS (SELECT 1 FROM {} t WHERE {}){}").format(
        staged, target, match, kept)).fetchone()
    published = int(row[0]) if row else 0
    results = [CheckResult("published_count", published, distinct_staged, ok=published == distinct_staged,
                           hard="published_count" in hard,
                           detail="staged keys present in the live table"
                                  + (" with the staged row hash kept" if hashes is not None else ""))]
    for fk in config.foreign_keys:
        results.append(_orphans(conn, target, fk.columns, fk.parent, fk.parent_columns or fk.columns,
                                hard=fk.hard and "foreign_key" in hard, label="live"))
    return results


def record(conn: psycopg.Connection[Any], schema: str, audit_id: int | None, results: list[CheckResult]) -> None:
    """Write one refresh_data_quality row per check, linked to the run's audit row."""
    for r in results:
        conn.execute(
            sql.SQL("INSERT INTO {} (audit_log_id, metric_name, metric_value, expected_value, threshold_min,"
                    " threshold_max, is_within_threshold) VALUES (%s, %s, %s, %s, %s, %s, %s)").format(
                ident(schema, "refresh_data_quality")),
            (audit_id, r.name, r.value, r.expected, r.minimum, r.maximum, r.ok),
        )


def raise_on_hard_failures(table: str, results: list[CheckResult]) -> None:
    failed = [r for r in results if r.hard and not r.ok]
    if failed:
        what = "; ".join(f"{r.name}: {r.detail or f'{r.value} vs expected {r.expected}'}" for r in failed)
        raise QualityCheckFailed(f"quality check failed, nothing published: {what}", table=table,
                                 checks=[asdict(r) for r in failed])


_DECLARED = re.compile(r"^(?:(integer|smallint)|character varying\((\d+)\)|character\((\d+)\)|numeric\((\d+),(\d+)\))$")
_INT_RANGE = {"integer": 2**31 - 1, "smallint": 2**15 - 1}


def declared_fit(conn: psycopg.Connection[Any], *, staging: sql.Composable, columns: list[Column], key: list[str],
                 declared: dict[str, str]) -> list[CheckResult]:
    """A table the users made themselves may declare narrower columns than bq-refresh's contract (``integer`` for
    INT64, ``character varying(n)`` for STRING, ``numeric(p,s)`` for NUMERIC). PostgreSQL's assignment would raise
    for some values and silently round others: every staged value is checked against the declared type first, and
    a value the column cannot hold fails the table (hard, before anything is published), naming the column, its
    declared type, a key and the value. FLOAT64 into ``numeric(p,s)`` is rounded to the scale, as documented: only
    the precision is checked, and the rows rounded are counted (a soft, passing check that says how many).

    Args:
        declared: target column -> its format_type() (load.target_columns).
    """
    checked: list[tuple[Column, str, sql.Composable, sql.Composable | None]] = []  # column, declared, bad, rounded
    for c in columns:
        have = declared.get(c.target_name)
        m = _DECLARED.match(have or "")
        if have is None or m is None or have == c.pg_type:
            continue
        col = sql.SQL("s.{}").format(ident(c.target_name))
        rounded: sql.Composable | None = None
        if m.group(1):
            bad = sql.SQL("abs({}::numeric) > {}").format(col, sql.Literal(_INT_RANGE[m.group(1)]))
        elif m.group(2) or m.group(3):
            bad = sql.SQL("char_length({}::text) > {}").format(col, sql.Literal(int(m.group(2) or m.group(3))))
        else:
            precision, scale = int(m.group(4)), int(m.group(5))
            too_big = sql.SQL("abs(round({}::numeric, {})) >= 10::numeric ^ {}").format(
                col, sql.Literal(scale), sql.Literal(precision - scale))
            if c.bq_type in {"FLOAT64", "FLOAT"}:
                bad = too_big
                rounded = sql.SQL("{}::numeric <> round({}::numeric, {})").format(col, col, sql.Literal(scale))
            else:
                bad = sql.SQL("({} OR {}::numeric <> round({}::numeric, {}))").format(too_big, col, col, sql.Literal(scale))
        checked.append((c, have, sql.SQL("{} IS NOT NULL AND {}").format(col, bad), rounded))
    if not checked:
        return []
    # One scan of the staging for every declared column (a table of 25 narrower columns is read once, not 25 times):
    # per column the count of values it cannot hold, the first such value and its key, and the rows rounded.
    key_json = sql.SQL("row_to_json(k)::text")
    parts: list[sql.Composable] = []
    for c, _have, wrong, rounded in checked:
        parts.append(sql.SQL("count(*) FILTER (WHERE {b}), min(ARRAY[{k}, s.{c}::text]) FILTER (WHERE {b})").format(
            b=wrong, k=key_json, c=ident(c.target_name)))  # the key and the value of one row
        if rounded is not None:
            parts.append(sql.SQL("count(*) FILTER (WHERE {})").format(rounded))
    row = conn.execute(sql.SQL("SELECT {} FROM {} s, LATERAL (SELECT {}) k").format(
        sql.SQL(", ").join(parts), staging, sql.SQL(", ").join(sql.SQL("s.{}").format(ident(k)) for k in key))).fetchone()
    assert row is not None
    values = iter(row)
    results: list[CheckResult] = []
    for c, have, _bad, rounded in checked:
        n, example = int(next(values)), next(values)
        at, value = example if example else (None, None)
        detail = (f"{c.target_name} is declared {have}: {n} value(s) it cannot hold, e.g. {value} at key {at}"
                  if n else f"every value fits {c.target_name} {have}")
        results.append(CheckResult(f"fits:{c.target_name}", float(n), 0.0, ok=n == 0, hard=True, detail=detail))
        if rounded is not None:
            count = int(next(values))
            results.append(CheckResult(f"rounded:{c.target_name}", float(count), None, ok=True, hard=False,
                                       detail=f"{count} FLOAT64 value(s) rounded to {have}"))
    return results
