"""The fast paths: a row hash per row (unchanged rows never reach PostgreSQL) and the initial load
straight into an empty target with its indexes built afterwards, all-or-nothing in one transaction.

Measured by bench/run.py (docs/benchmarks.md).
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import sql

from bq_refresh.errors import RefreshError
from tasks import rowhash
from tasks.sqlnames import ident, quote_ident
from tasks.typemap import Column

log = logging.getLogger(__name__)
HASH_COLUMN = "_bqr_row_hash"


def row_hashes(rows: pa.RecordBatch, columns: list[Column]) -> pa.Array:
    """A 64-bit hash of each row's published values (key included), as int64 for a bigint column: XXH64 over the
    row's canonical bytes (tasks/rowhash.py), each value first cast to its column's Arrow type, so that the rows
    read from BigQuery and the same rows read back from PostgreSQL hash alike, in every library version."""
    arrays = []
    for c in columns:
        arr = rows.column(c.target_name)
        arrays.append(arr.cast(c.arrow_type) if arr.type != c.arrow_type else arr)
    return rowhash.row_hashes(arrays)


class HashSet:
    """The target's row hashes, held as one sorted int64 array (8 bytes a row) for membership tests."""

    def __init__(self, values: np.ndarray[Any, Any]) -> None:
        self.values = np.sort(values)  # sorted, for searchsorted (np.unique is 15x slower here and not needed)

    def __len__(self) -> int:
        return int(self.values.size)

    def contains(self, hashes: pa.Array) -> np.ndarray[Any, Any]:
        h = hashes.to_numpy(zero_copy_only=False)
        if not self.values.size:
            return np.zeros(h.shape, dtype=bool)
        pos = np.searchsorted(self.values, h)
        pos[pos >= self.values.size] = 0
        return np.asarray(self.values[pos] == h)


def load_hashes(adbc_conn: Any, query: str) -> HashSet:
    """Read row hashes (the first column of ``query``'s rows) in Arrow batches."""
    parts = []
    with adbc_conn.cursor() as cur:
        cur.execute(query)
        for batch in cur.fetch_record_batch():
            parts.append(batch.column(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False))
    adbc_conn.rollback()
    return HashSet(np.concatenate(parts) if parts else np.empty(0, np.int64))


@dataclass
class LocalSource:
    """Arrow batches handed over in-process instead of a BigQuery read session (benchmarks, imports).

    ``streams`` maps a stream name to a function that yields the stream's batches starting at a row offset.
    """

    schema: pa.Schema
    streams: dict[str, Callable[[int], Iterator[pa.RecordBatch]]]
    ref: str = "local.arrow.batches"
    estimated_rows: int = 0


def local_slices(local: LocalSource, key: list[str], window: str | None) -> list[Any]:
    """What ``reconcile.source_slices`` answers for BigQuery, for in-process batches: per period (or for all),
    the rows and the distinct keys without a NULL. Every row of a local source counts as changed (read whole).

    Keys are counted by a 64-bit hash of the key (16 bytes a row held, not the key's strings): a collision
    could only make a count lower than the truth, which fails the reconciliation (never passes a loss).
    """
    from tasks.reconcile import SourceSlice, period_text

    ids: dict[Any, int] = {}  # period value -> its number
    rows: list[int] = []  # per period number
    hashes: list[list[np.ndarray[Any, Any]]] = []  # per period number: its keyed rows' key hashes, batch by batch
    for stream in local.streams.values():
        for batch in stream(0):
            keys = [batch.column(k) for k in key]
            keyed = np.ones(batch.num_rows, bool)
            for k in keys:
                if k.null_count:
                    keyed &= np.asarray(k.is_valid().to_numpy(zero_copy_only=False), bool)
            if window:
                encoded = batch.column(window).dictionary_encode()
                number = np.asarray([ids.setdefault(v, len(ids)) for v in encoded.dictionary.to_pylist()]
                                    + [ids.setdefault(None, len(ids))], np.int64)
                period = number[np.asarray(encoded.indices.fill_null(len(number) - 1)
                                           .to_numpy(zero_copy_only=False), np.int64)]
            else:
                period = np.full(batch.num_rows, ids.setdefault(None, 0), np.int64)
            while len(rows) < len(ids):
                rows.append(0)
                hashes.append([])
            for p, n in enumerate(np.bincount(period, minlength=len(ids)).tolist()):
                rows[p] += n
            h = rowhash.row_hashes(keys).to_numpy(zero_copy_only=False)[keyed]
            of_keyed = period[keyed]
            for p in np.unique(of_keyed).tolist():
                hashes[p].append(h[of_keyed == p])
    values = {number: value for value, number in ids.items()}
    return [SourceSlice(period_text(values[p]), rows[p],
                        int(np.unique(np.concatenate(hashes[p])).size) if hashes[p] else 0, rows[p])
            for p in range(len(rows)) if rows[p]]


class AdbcSession:
    """psycopg-style ``execute`` inside an ADBC connection's open transaction.

    Statements and parameters are rendered client-side by psycopg (proper quoting), then run on the ADBC
    connection, so DDL, checks and bookkeeping share the COPY's transaction.
    """

    def __init__(self, adbc_conn: Any, quoting: psycopg.Connection[Any]) -> None:
        self.adbc = adbc_conn
        self.quoting = quoting

    def execute(self, query: Any, params: Any = None) -> Any:
        text = psycopg.ClientCursor(self.quoting).mogrify(query, params)
        cur = self.adbc.cursor()
        cur.execute(text)
        return _Result(cur)


class _Result:
    def __init__(self, cur: Any) -> None:
        self.cur = cur

    def fetchone(self) -> Any:
        try:
            row = self.cur.fetchone()
        except Exception:  # noqa: BLE001 - a statement without a result set
            row = None
        self.cur.close()
        return row

    def fetchall(self) -> list[Any]:
        try:
            rows = list(self.cur.fetchall())
        except Exception:  # noqa: BLE001
            rows = []
        self.cur.close()
        return rows


@dataclass
class TableIndexes:
    """The indexes (and primary key / unique constraints) of a table, to drop and build again."""

    constraints: list[tuple[str, str]] = field(default_factory=list)  # (name, definition)
    indexes: list[tuple[str, str]] = field(default_factory=list)  # (name, CREATE INDEX ...)


def table_indexes(conn: Any, schema: str, table: str) -> TableIndexes:
    regclass = f"{quote_ident(schema)}.{quote_ident(table)}"
    cons = conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = to_regclass(%s)"
        " AND contype IN ('p', 'u') ORDER BY contype, conname", (regclass,)).fetchall()
    idx = conn.execute(
        "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
        " WHERE x.indrelid = to_regclass(%s)"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid) ORDER BY 1", (regclass,)).fetchall()
    return TableIndexes([(str(a), str(b)) for a, b in cons], [(str(a), str(b)) for a, b in idx])


class DirectLoadAbandoned(RefreshError):
    """The direct load could not finish (the target got rows, or the source repeats a key); the caller
    stages instead. Nothing of the direct attempt is kept."""

    transient = True


def drop_indexes(session: AdbcSession, schema: str, table: str, found: TableIndexes) -> TableIndexes:
    """Drop what can be dropped; keep constraints something depends on (a foreign key, a view)."""
    dropped = TableIndexes()
    for name, definition in found.constraints:
        session.execute("SAVEPOINT bqr_drop")
        try:
            session.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(ident(schema, table), ident(name)))
            dropped.constraints.append((name, definition))
            session.execute("RELEASE SAVEPOINT bqr_drop")
        except Exception as exc:  # noqa: BLE001 - a dependent object: keep this constraint
            session.execute("ROLLBACK TO SAVEPOINT bqr_drop")
            log.info("%s.%s: keeping constraint %s during the load (%s)", schema, table, name, str(exc).splitlines()[0])
    for name, definition in found.indexes:
        session.execute(sql.SQL("DROP INDEX {}").format(ident(schema, name)))
        dropped.indexes.append((name, definition))
    return dropped


def rebuild_indexes(session: AdbcSession, schema: str, table: str, dropped: TableIndexes) -> None:
    for name, definition in dropped.constraints:
        session.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(ident(schema, table), ident(name))
                        + sql.SQL(definition))  # pg_get_constraintdef output: quoted by PostgreSQL itself
    for _name, definition in dropped.indexes:
        session.execute(sql.SQL(definition))  # pg_get_indexdef output


def pipelined(producers: list[Callable[[Callable[[Any], None]], None]], depth: int = 4,
              errors: list[BaseException] | None = None) -> Iterator[Any]:
    """Run each producer in its own thread; yield what they put, in arrival order; re-raise their errors
    (also appended to ``errors``: a consumer in C, like a COPY pulling batches, re-says them in its own words).

    Memory is bounded by ``depth`` items in flight.
    """
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                q.put(("item", item), timeout=0.2)
                return
            except queue.Full:
                continue
        raise RuntimeError("consumer stopped")

    def run(producer: Callable[[Callable[[Any], None]], None]) -> None:
        try:
            producer(put)
            q.put(("done", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            q.put(("error", exc))

    # Each producer runs in a copy of the caller's context: its log lines belong to the run.
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(run, p), daemon=True) for p in producers]
    for t in threads:
        t.start()
    left = len(threads)
    try:
        while left:
            kind, item = q.get()
            if kind == "item":
                yield item
            elif kind == "done":
                left -= 1
            else:
                raise item
    except BaseException as exc:  # a producer's error, or this thread interrupted (a flow timeout, a cancel)
        if errors is not None:
            errors.append(exc)
        raise
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)


def sampled(hashes: pa.Array, sample: int) -> int:
    """How many rows fall in the verification sample: those whose hash is 0 modulo ``sample`` (a power of 2)."""
    if sample <= 1:
        return len(hashes)
    h = hashes.to_numpy(zero_copy_only=False)
    return int(np.count_nonzero((h & (sample - 1)) == 0))


def verify_rows(adbc_conn: Any, schema: str, table: str, columns: list[Column], sample: int,
                relation: str | None = None) -> tuple[int, int]:
    """Read back the sampled rows (of ``schema.table``, or of the query ``relation``) with their stored hash, recompute each row's hash from the values PostgreSQL
    holds, and return (rows read back, rows whose values hash to their stored hash).

    Every value of every sampled row is checked; the sample is chosen by the hash itself (deterministic, the
    same in-process and in PostgreSQL), so a systematic conversion error shows in thousands of rows.
    """
    names = ", ".join(quote_ident(c.target_name) for c in columns)
    where = f" WHERE ({quote_ident(HASH_COLUMN)} & {sample - 1}) = 0" if sample > 1 else ""
    source = f"({relation}) v" if relation else f"{quote_ident(schema)}.{quote_ident(table)}"
    text = (f"SELECT {names}, {quote_ident(HASH_COLUMN)} FROM {source}{where}")  # noqa: S608
    seen = good = 0
    with adbc_conn.cursor() as cur:
        cur.execute(text)
        for batch in cur.fetch_record_batch():
            stored = batch.column(len(columns)).to_numpy(zero_copy_only=False)
            values = pa.RecordBatch.from_arrays(batch.columns[: len(columns)], names=[c.target_name for c in columns])
            again = row_hashes(values, columns).to_numpy(zero_copy_only=False)
            seen += batch.num_rows
            good += int(np.count_nonzero(again == stored))
    return seen, good
