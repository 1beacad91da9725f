"""Loading into PostgreSQL: target and staging DDL, ADBC COPY with its checkpoint, the publish SQL, and the
statistics after a publish."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pyarrow as pa
from psycopg import sql

from bq_refresh.errors import ConfigError
from tasks import checkpoints, quarantine, rowhash
from tasks.fastpath import HASH_COLUMN
from tasks.sqlnames import ident, idents, quote_ident
from tasks.typemap import Column

log = logging.getLogger(__name__)

SEQ_COLUMN = "_bqr_seq"
# The tables one run owns in the staging schema: its staged rows, the source's keys (delete reconciliation)
# and the hashes of rows found unchanged.
RUN_TABLE_SUFFIXES = ("", "_keys", "_same")


ROWHASH_SUFFIX = "_rowhash"
FLOAT_TYPES = {"double precision", "real"}


def rowhash_table(target_schema: str, target_table: str) -> str:
    """The side table (in the staging schema) holding one hash per row of a live table, keyed by its key: what
    lets a reload skip the rows it already holds without a column in the users' table. Named after the target
    (a shadow target has its own); no run's staging table ends like it."""
    digest = hashlib.sha1(f"{target_schema}.{target_table}".encode()).hexdigest()[:8]
    base = "".join(ch if ch.isalnum() else "_" for ch in target_table)[:40]
    return f"{base}_{digest}{ROWHASH_SUFFIX}"


def ensure_rowhash(conn: psycopg.Connection[Any], staging_schema: str, target_schema: str, target_table: str,
                   columns: list[Column], key: list[str]) -> str:
    """Create the target's row-hash side table if missing, and make it afresh when it was kept for another table
    of that name (the target dropped and made again), another key or another hash function (``rowhash.VERSION``:
    the hashes of bq-refresh 0.1's Polars-based function, once, so the next run stages every row, and the merge
    writes none that did not change): a hash says "the live row with this key is exactly this", so one that outlived
    its row, or that this version cannot reproduce, must go. A live table still carrying the row-hash column of earlier
    versions loses the column, its hashes not kept (its owner only; else the column stays, unused).

    Returns:
        The side table's name (in ``staging_schema``).
    """
    name = rowhash_table(target_schema, target_table)
    side = ident(staging_schema, name)
    target = ident(target_schema, target_table)
    oid_row = conn.execute("SELECT %s::regclass::oid::text", (target.as_string(conn),)).fetchone()
    assert oid_row is not None
    same_row = f"bq-refresh row hashes of {target_schema}.{target_table} (oid {oid_row[0]}, key {', '.join(key)}"
    marker = f"{same_row}, {rowhash.VERSION})"
    ensure_schema(conn, staging_schema)
    if table_exists(conn, staging_schema, name):
        held = conn.execute("SELECT obj_description(%s::regclass, 'pg_class')", (side.as_string(conn),)).fetchone()
        if held is not None and held[0] == marker:
            return name
        if held is not None and str(held[0]).startswith(same_row):
            log.warning("%s.%s: its row hashes were made by an earlier hash function; this run stages every row"
                        " once (rows that did not change are not rewritten)", target_schema, target_table)
        conn.execute(sql.SQL("DROP TABLE {}").format(side))  # kept for another table of that name, or key
    types = {c.target_name: c.pg_type for c in columns}
    conn.execute(sql.SQL("CREATE TABLE {} ({}, h bigint NOT NULL, PRIMARY KEY ({}))").format(
        side, sql.SQL(", ").join(sql.SQL("{} {}").format(ident(k), sql.SQL(types[k])) for k in key), idents(key)))
    conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(side, sql.Literal(marker)))
    if HASH_COLUMN in target_columns(conn, target_schema, target_table):  # once, when the side table is made
        # Its hashes were made by the Polars-based function of those versions: not kept (the run stages every row
        # once; the merge rewrites none that did not change).
        conn.execute("SAVEPOINT bqr_drop_hash")
        try:
            conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN {}").format(target, ident(HASH_COLUMN)))
            conn.execute("RELEASE SAVEPOINT bqr_drop_hash")
        except psycopg.errors.InsufficientPrivilege:
            conn.execute("ROLLBACK TO SAVEPOINT bqr_drop_hash")
            log.warning("%s.%s keeps its old %s column (only its owner may drop it); bq-refresh no longer writes it",
                        target_schema, target_table, HASH_COLUMN)
    return name


def run_tables(staging_table: str) -> list[str]:
    """Every staging-schema table of the run whose staging table is ``staging_table``."""
    return [staging_table + suffix for suffix in RUN_TABLE_SUFFIXES]


def run_of(table: str) -> str:
    """The staging table of the run that owns ``table`` (the inverse of run_tables)."""
    for suffix in RUN_TABLE_SUFFIXES:
        if suffix and table.endswith(suffix):
            return table[: -len(suffix)]
    return table


def table_exists(conn: psycopg.Connection[Any], schema: str, table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"{quote_ident(schema)}.{quote_ident(table)}",)).fetchone()
    return bool(row and row[0])


def target_columns(conn: psycopg.Connection[Any], schema: str, table: str) -> dict[str, str]:
    """Column name -> formatted type of an existing table."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
        " WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (f"{quote_ident(schema)}.{quote_ident(table)}",),
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def has_unique_key(conn: psycopg.Connection[Any], schema: str, table: str, key: list[str]) -> bool:
    """True when a unique index (or primary key) covers exactly the key columns."""
    rows = conn.execute(
        "SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_index i"
        " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indpred IS NULL GROUP BY i.indexrelid",
        (f"{quote_ident(schema)}.{quote_ident(table)}",),
    ).fetchall()
    return any(sorted(r[0]) == sorted(key) for r in rows)


def ensure_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    """Create ``schema`` only when missing: CREATE SCHEMA IF NOT EXISTS needs CREATE on the database even
    when the schema exists, which a least-privilege role does not have."""
    if conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is None:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident(schema)))


def create_target(conn: psycopg.Connection[Any], schema: str, table: str, columns: list[Column], key: list[str]) -> None:
    """Create the live table from the contract's types, with a primary key on the key columns: the users' schema
    and nothing else (row hashes live in a side table, ``rowhash_table``)."""
    parts = [
        sql.SQL("{} {}{}").format(
            ident(c.target_name), sql.SQL(c.pg_type), sql.SQL(" NOT NULL" if c.target_name in key else "")
        )
        for c in columns
    ]
    cols = sql.SQL(", ").join(parts)
    ensure_schema(conn, schema)
    conn.execute(
        sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(ident(schema, table), cols, idents(key))
    )


def _staging_columns(columns: list[Column]) -> sql.Composed:
    return sql.SQL(", ").join(sql.SQL("{} {}").format(ident(c.target_name), sql.SQL(c.staging_type)) for c in columns)


def create_staging(conn: psycopg.Connection[Any], schema: str, table: str, columns: list[Column], *,
                   row_hash: bool = False, same: str | None = None, logged: bool = False) -> None:
    """An UNLOGGED staging table of this run (JSON as text; a batch sequence for 'latest wins').

    UNLOGGED: crash recovery empties it; a resumed run proves it still holds what its checkpoint records
    (refresh_plan: its resume decision) and starts over when it does not.

    Args:
        row_hash: staged rows carry their row hash.
        same: also a table of this name for the hashes of rows found unchanged, which are not staged.
        logged: WAL-logged tables instead (REFRESH_STAGING_LOGGED; measured in docs/benchmarks.md).
    """
    kind = sql.SQL("TABLE" if logged else "UNLOGGED TABLE")
    cols = _staging_columns(columns)
    if row_hash:
        cols = sql.SQL("{}, {} bigint").format(cols, ident(HASH_COLUMN))
    ensure_schema(conn, schema)
    if same is not None:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident(schema, same)))
        conn.execute(sql.SQL("CREATE {} {} (h bigint NOT NULL)").format(kind, ident(schema, same)))
    conn.execute(
        sql.SQL("CREATE {} IF NOT EXISTS {} ({}, {} bigint NOT NULL)").format(
            kind, ident(schema, table), cols, ident(SEQ_COLUMN)
        )
    )


def create_key_table(conn: psycopg.Connection[Any], schema: str, table: str, columns: list[Column]) -> None:
    cols = _staging_columns(columns)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident(schema, table)))
    conn.execute(sql.SQL("CREATE UNLOGGED TABLE {} ({})").format(ident(schema, table), cols))


def add_columns(conn: psycopg.Connection[Any], schema: str, table: str, columns: list[Column]) -> None:
    """Schema evolution: add new nullable columns (instant in PostgreSQL 11+)."""
    for c in columns:
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                ident(schema, table), ident(c.target_name), sql.SQL(c.pg_type)
            )
        )


@dataclass(frozen=True)
class BatchLoad:
    """Where one batch goes and which checkpoint moves with it."""

    staging_schema: str
    staging_table: str
    registry_schema: str
    checkpoint_id: int
    stream: str
    offset_after: int
    stream_done: bool
    seq: int
    table_schema: str
    table_name: str
    audit_id: int | None
    checksum: int = 0
    same_table: str | None = None
    refetched: int = 0  # rows read by key outside the read session (counted apart by the row-count check)


def ingest_batch(adbc_conn: Any, batch: pa.RecordBatch, load: BatchLoad, quarantined: list[dict[str, Any]],
                 same: pa.Table | None = None) -> None:
    """COPY one batch into staging (and the hashes of its unchanged rows) and move its checkpoint, in ONE
    transaction.

    A crash before commit loses both (the rerun re-reads the batch); after commit keeps both.
    """
    with adbc_conn.cursor() as cur:
        if batch.num_rows:
            seq = pa.array([load.seq] * batch.num_rows, pa.int64())
            data = pa.Table.from_batches([batch.append_column(SEQ_COLUMN, seq)])
            cur.adbc_ingest(load.staging_table, data, mode="append", db_schema_name=load.staging_schema)
    unchanged = 0
    if same is not None and same.num_rows and load.same_table:
        unchanged = same.num_rows
        with adbc_conn.cursor() as cur:  # a fresh cursor: db_schema_name sticks to a reused one
            cur.adbc_ingest(load.same_table, same, mode="append", db_schema_name=load.staging_schema)
    with adbc_conn.cursor() as cur:
        checkpoints.record_batch(cur, load.registry_schema, load.checkpoint_id, stream=load.stream,
                                 offset_after=load.offset_after, stream_done=load.stream_done, rows=batch.num_rows,
                                 checksum=load.checksum, quarantined=len(quarantined), unchanged=unchanged,
                                 refetched=load.refetched)
    quarantine.set_aside(adbc_conn, load.registry_schema, load.audit_id, f"{load.table_schema}.{load.table_name}",
                         quarantined)
    adbc_conn.commit()


@dataclass(frozen=True)
class PublishSQL:
    """Names a publish works with."""

    target: sql.Composable
    staging: sql.Composable
    columns: list[Column]
    key: list[str]
    cursor: str | None
    hashes: sql.Composable | None = None  # the target's row-hash side table, when the staged rows carry hashes
    wall_time: dict[str, str] = field(default_factory=dict)  # TIMESTAMP column -> zone (RefreshPlan.wall_time)

    def typed_select(self, alias: str = "s", *, only: list[str] | None = None, with_hash: bool = False,
                     as_declared: bool = False) -> sql.Composed:
        """The staged columns in the contract's types, or (``as_declared``, for the rows written into the target)
        with TIMESTAMPs the target declares without time zone as wall times of their zone."""
        parts = []
        for c in self.columns:
            if only is not None and c.target_name not in only:
                continue
            col = sql.SQL("{}.{}").format(sql.Identifier(alias), ident(c.target_name))
            if c.pg_type != c.staging_type:
                col = sql.SQL("{}::{}").format(col, sql.SQL(c.pg_type))
            if as_declared and c.target_name in self.wall_time:
                col = sql.SQL("({} AT TIME ZONE {})").format(col, sql.Literal(self.wall_time[c.target_name]))
            parts.append(col)
        if with_hash:
            parts.append(sql.SQL("{}.{}").format(sql.Identifier(alias), ident(HASH_COLUMN)))
        return sql.SQL(", ").join(parts)

    def deduped(self, *, with_hash: bool = False, only: list[str] | None = None, as_declared: bool = False) -> sql.Composed:
        """Staged rows, one per key: the latest cursor wins, then the latest batch (with their row hash, or
        only some columns, on demand)."""
        order: list[sql.Composable] = [ident(k) for k in self.key]
        if self.cursor:
            order.append(sql.SQL("{} DESC NULLS LAST").format(ident(self.cursor)))
        order.append(sql.SQL("{} DESC").format(ident(SEQ_COLUMN)))
        return sql.SQL("SELECT DISTINCT ON ({}) {} FROM {} s ORDER BY {}").format(
            idents(self.key), self.typed_select("s", only=only, with_hash=with_hash, as_declared=as_declared), self.staging,
            sql.SQL(", ").join(order)
        )

    def upsert_hashes(self) -> sql.Composed:
        """The published rows' hashes into the side table, in the publish's transaction (the same row per key as
        the merge: same order)."""
        assert self.hashes is not None
        return sql.SQL("INSERT INTO {} AS r ({}, h) {} ON CONFLICT ({}) DO UPDATE SET h = EXCLUDED.h"
                       " WHERE r.h IS DISTINCT FROM EXCLUDED.h").format(
            self.hashes, idents(self.key), self.deduped(with_hash=True, only=self.key), idents(self.key))

    def hashes_of(self, alias: str, keys_from: str = "d") -> sql.Composed:
        """Delete the side table's rows whose key is in ``keys_from`` (a CTE of deleted keys)."""
        assert self.hashes is not None
        return sql.SQL("DELETE FROM {} {} USING {} WHERE {}").format(
            self.hashes, sql.Identifier(alias), sql.Identifier(keys_from), self.key_match(alias, keys_from))

    def key_match(self, left: str, right: str) -> sql.Composed:
        return sql.SQL(" AND ").join(
            sql.SQL("{}.{} = {}.{}").format(sql.Identifier(left), ident(k), sql.Identifier(right), ident(k))
            for k in self.key
        )

    def merge(self, revive_column: str | None = None) -> sql.Composed:
        """INSERT ... ON CONFLICT DO UPDATE only where the row really changed; counts inserts/updates.

        Args:
            revive_column: a soft-delete column to clear when a deleted key comes back.
        """
        names = [c.target_name for c in self.columns]
        non_key = [n for n in names if n not in self.key]
        if non_key or revive_column:
            sets = [sql.SQL("{} = EXCLUDED.{}").format(ident(n), ident(n)) for n in non_key]
            guards = []
            if non_key:
                # A float compared by its text: -0 and 0 are equal to PostgreSQL's IS DISTINCT FROM, but they are
                # different values of the source and of the row hash (a change between them must be written).
                floats = {c.target_name for c in self.columns if c.pg_type.split("[")[0] in FLOAT_TYPES}
                guards.append(sql.SQL("({}) IS DISTINCT FROM ({})").format(
                    sql.SQL(", ").join(sql.SQL("t.{}" + ("::text" if n in floats else "")).format(ident(n))
                                       for n in non_key),
                    sql.SQL(", ").join(sql.SQL("EXCLUDED.{}" + ("::text" if n in floats else "")).format(ident(n))
                                       for n in non_key),
                ))
            if revive_column:
                sets.append(sql.SQL("{} = NULL").format(ident(revive_column)))
                guards.append(sql.SQL("t.{} IS NOT NULL").format(ident(revive_column)))
            action: sql.Composable = sql.SQL("DO UPDATE SET {} WHERE {}").format(
                sql.SQL(", ").join(sets), sql.SQL(" OR ").join(guards)
            )
        else:
            action = sql.SQL("DO NOTHING")
        return sql.SQL(
            "WITH up AS (INSERT INTO {} AS t ({}) {} ON CONFLICT ({}) {} RETURNING (xmax = 0) AS inserted)"
            " SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up"
        ).format(self.target, idents(names), self.deduped(as_declared=True), idents(self.key), action)


def check_target_shape(
    conn: psycopg.Connection[Any], schema: str, table: str, key: list[str], table_label: str
) -> None:
    if not has_unique_key(conn, schema, table, key):
        raise ConfigError(
            f"target {schema}.{table} has no primary key or unique index on ({', '.join(key)}); "
            "upserts need one", table=table_label,
        )


# Which policies a command is filtered by (pg_policy.polcmd: '*' all, r select, a insert, w update, d delete).
_RLS_COMMANDS = {"SELECT": "r", "INSERT": "a", "UPDATE": "w", "DELETE": "d"}


def rls_refusal(conn: psycopg.Connection[Any], schema: str, table: str) -> str | None:
    """Why the refresh's role cannot be trusted to write every row of ``schema.table`` under row-level security,
    or None when it can.

    Row-level security applies to the role when the table has it on and the role neither bypasses it (superuser,
    BYPASSRLS) nor owns the table, or the table has FORCE ROW LEVEL SECURITY (then its owner too). Rows its
    policies hide would then be silently neither updated nor deleted, and every count the checks make would see
    only the visible rows: a copy that passes its checks while rows are stale. So it is refused unless
    permissive policies give the role every row for SELECT, INSERT, UPDATE and DELETE (``USING (true)``, a check
    of ``true``) and no restrictive policy narrows them.
    """
    info = conn.execute(
        "SELECT c.relrowsecurity, c.relforcerowsecurity, pg_has_role(c.relowner, 'USAGE'),"
        " (SELECT r.rolsuper OR r.rolbypassrls FROM pg_roles r WHERE r.rolname = current_user), current_user"
        " FROM pg_class c WHERE c.oid = to_regclass(%s)", (f"{quote_ident(schema)}.{quote_ident(table)}",)).fetchone()
    if info is None or not info[0] or info[3] or (info[2] and not info[1]):
        return None
    role = str(info[4])
    policies = conn.execute(
        "SELECT p.polname, p.polpermissive, p.polcmd::text, pg_get_expr(p.polqual, p.polrelid),"
        " pg_get_expr(p.polwithcheck, p.polrelid) FROM pg_policy p"
        " WHERE p.polrelid = to_regclass(%s) AND (0 = ANY (p.polroles) OR EXISTS"
        " (SELECT 1 FROM unnest(p.polroles) r WHERE r <> 0 AND pg_has_role(current_user, r, 'USAGE')))"
        " ORDER BY p.polname", (f"{quote_ident(schema)}.{quote_ident(table)}",)).fetchall()
    why = (f"target {schema}.{table} has FORCE ROW LEVEL SECURITY (even its owner is filtered)" if info[1]
           else f"target {schema}.{table} has row-level security on and {role} does not own it")
    narrowing = [str(name) for name, permissive, _cmd, qual, check in policies
                 if not permissive and (qual not in (None, "true") or check not in (None, "true"))]
    if narrowing:
        return (f"{why}, and restrictive polic{'y' if len(narrowing) == 1 else 'ies'}"
                f" {', '.join(narrowing)} narrow what {role} may write: rows hidden from it would be left stale"
                " while every check passes; drop them for this role or refresh as a role that bypasses them")
    missing = []
    for command, code in _RLS_COMMANDS.items():
        reads = command in {"SELECT", "UPDATE", "DELETE"}
        writes = command in {"INSERT", "UPDATE"}
        if not any(permissive and cmd in ("*", code) and (not reads or qual == "true")
                   and (not writes or (check if check is not None else qual) == "true")
                   for _name, permissive, cmd, qual, check in policies):
            missing.append(command)
    if not missing:
        return None
    target = f"{quote_ident(schema)}.{quote_ident(table)}"
    return (f"{why}, and no policy gives {role} every row for {', '.join(missing)}: rows its"
            " policies hide would be left stale (neither updated nor deleted) while every check passes. Add"
            f" CREATE POLICY bq_refresh_all ON {target} FOR ALL TO {quote_ident(role)} USING (true) WITH CHECK (true);"
            " (bq-refresh role-sql writes it for a dedicated role)")


def secondary_indexes(conn: psycopg.Connection[Any], schema: str, table: str) -> list[tuple[str, str]]:
    """(name, definition) of the table's indexes that back no constraint and are not unique."""
    rows = conn.execute(
        "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
        " WHERE x.indrelid = to_regclass(%s) AND NOT x.indisprimary AND NOT x.indisunique"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)",
        (f"{quote_ident(schema)}.{quote_ident(table)}",),
    ).fetchall()
    return [(str(r[0]), str(r[1])) for r in rows]


# ANALYZE waits behind a VACUUM or an index build of the same table (its lock conflicts with theirs): it gives up
# after this long and autovacuum analyzes the table later instead.
ANALYZE_LOCK_TIMEOUT = "5s"


def analyze_due(changed: int, estimated_rows: float, fraction: float) -> bool:
    """Whether a publish that inserted, updated and deleted ``changed`` rows of a table the planner believed held
    ``estimated_rows`` (pg_class.reltuples before the publish; -1 or 0 when never analyzed) left its statistics so
    stale that the table is analyzed at once rather than whenever autovacuum gets to it."""
    if changed <= 0:
        return False
    return estimated_rows <= 0 or changed > fraction * estimated_rows


@dataclass(frozen=True)
class Analysis:
    """What ``analyze_after_publish`` did: analyzed or not, and why not when it was due."""

    analyzed: bool
    error: str | None = None


def analyze_after_publish(conn: psycopg.Connection[Any], schema: str, table: str, changed: int,
                          fraction: float) -> Analysis:
    """ANALYZE a live table after a publish that changed more than ``fraction`` of it, so that the dashboards'
    queries are planned on its new contents. Runs on an autocommit connection, after the publish's COMMIT (never
    inside it); it never fails the run: a refusal or an error is logged and returned.

    Only the owner (or, from PostgreSQL 17, a role with MAINTAIN) may ANALYZE: others leave it to autovacuum.
    """
    target = ident(schema, table)
    row = conn.execute(
        "SELECT c.reltuples, CASE WHEN current_setting('server_version_num')::int >= 170000"
        " THEN has_table_privilege(c.oid, 'MAINTAIN')"
        " ELSE pg_has_role(c.relowner, 'USAGE') OR pg_has_role((SELECT datdba FROM pg_database"
        " WHERE datname = current_database()), 'USAGE') END FROM pg_class c WHERE c.oid = to_regclass(%s)",
        (target.as_string(conn),)).fetchone()
    if row is None or not analyze_due(changed, float(row[0]), fraction):
        return Analysis(False)
    if not row[1]:
        reason = "not the table's owner (nor MAINTAIN): its statistics are left to autovacuum"
        log.info("%s.%s: %d rows changed, not analyzed: %s", schema, table, changed, reason)
        return Analysis(False, reason)
    try:
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(ANALYZE_LOCK_TIMEOUT)))
            conn.execute(sql.SQL("ANALYZE {}").format(target))
    except psycopg.Error as exc:
        message = (exc.diag.message_primary or str(exc)).strip()
        log.warning("%s.%s: ANALYZE after the publish failed (the data is published): %s", schema, table, message)
        return Analysis(False, message)
    return Analysis(True)
