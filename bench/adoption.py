"""Adopting an existing table: an SQP table the users made with their own DDL and filled by an earlier manual
sync (a fraction of its rows now differ from the source), registered with bq-refresh and refreshed for the first
time, then a second time. Writes docs/adoption-benchmark.md.

    .venv/bin/python -m bench.adoption                     # 1M rows, 1% differing, 1 repetition
    .venv/bin/python -m bench.adoption --rows 50000 --differ 0.02 --repeat 3

The promise measured: the first run rewrites only the rows that differ (an update trigger fires for those alone,
the table barely grows) and fills the row hashes (a side table in the staging schema, not a column of the users'
table); the second run skips every row by hash. The engine runs as bench/contenders.py drives it (plan, stage,
quality gate, publish, fed in-process from the Parquet file through tasks.fastpath.LocalSource), in a child
process of its own: its wall time is measured inside it, its peak RSS comes from wait4.

Checked without the product's code: the users' table against the Parquet rows (loaded by COPY into a plain
table) value by value, both ways, under the declared types (a ``timestamp without time zone`` holds the UTC wall
time); the rows given a new row version (xmin) are exactly the rows that differed; the users' DDL, indexes,
trigger and own column are untouched. Exits 1 when anything differs or a count breaks the promise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
from psycopg import sql

from bench import data
from bq_refresh.offline import configure_offline_prefect

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".state" / "bench-adoption"
DATA_CACHE = ROOT / ".state" / "bench"  # bench/run.py's Parquet files, shared
DOC = ROOT / "docs" / "adoption-benchmark.md"
configure_offline_prefect(STATE)

USERS_SCHEMA, USERS_TABLE = "dashboard", "sqp_weekly"
FIRED_TABLE = "sqp_weekly_updates"  # the users' trigger counts each row it sees updated here
REGISTRY, STAGING = "bq_refresh", "bq_refresh_staging"
SOURCE_SCHEMA, SOURCE_TABLE = "adoption_source", "sqp"  # the Parquet rows as they are (and which ones differ)
DIFFERS = "differs"
CHANGED_COLUMN = "impressions_total"  # the metric the users' copy holds an older value of
PER_MILLION = 1_000_000
SOURCE_TYPES = dict(data.COLUMNS)
# The role's sessions default to a zone far from UTC: a wall time written through the session's TimeZone instead
# of the explicit conversion would show in the comparison.
ROLE_TIMEZONE = "Asia/Kathmandu"

# As an SQP dashboard's engineer wrote it by hand: their own column order, narrower types than BigQuery's INT64,
# STRING, NUMERIC and TIMESTAMP (each wide enough for every value of bench/data.py), a column of their own.
USERS_COLUMNS: list[tuple[str, str]] = [
    ("asin", "character varying(10) NOT NULL"), ("start_date", "date NOT NULL"), ("end_date", "date"),
    ("search_query", "character varying(255) NOT NULL"), ("marketplace", "character varying(16)"),
    ("currency", "character(3)"), ("reporting_date", "date"),
    ("search_query_score", "smallint"), ("search_query_volume", "integer"),
    ("impressions_total", "integer"), ("impressions_asin", "integer"), ("impressions_share", "numeric(10,9)"),
    ("clicks_total", "integer"), ("clicks_asin", "integer"), ("clicks_share", "numeric(10,9)"),
    ("click_rate", "numeric(10,9)"),
    ("cart_adds_total", "integer"), ("cart_adds_asin", "integer"), ("cart_adds_share", "numeric(10,9)"),
    ("purchases_total", "integer"), ("purchases_asin", "integer"), ("purchases_share", "numeric(10,9)"),
    ("purchase_rate", "numeric(10,9)"),
    ("median_price_total", "numeric(15,9)"), ("median_price_asin", "numeric(15,9)"),
    ("same_day_shipping", "integer"), ("one_day_shipping", "integer"), ("two_day_shipping", "integer"),
    ("updated_at", "timestamp without time zone"),
    ("created_at", "timestamp with time zone NOT NULL DEFAULT now()"),
]
OWN_COLUMNS = {"created_at"}
SYNCED = [n for n, _ in USERS_COLUMNS if n not in OWN_COLUMNS]
WALL_TIME = {"updated_at"}  # TIMESTAMP declared without time zone: the UTC wall time
USERS_KEY_INDEX = ["asin", "start_date", "search_query"]  # a unique index, not a primary key
USERS_INDEX = ["search_query", "start_date"]


def q(*names: str) -> sql.Identifier:
    return sql.Identifier(*names)


USERS = q(USERS_SCHEMA, USERS_TABLE)
SOURCE = q(SOURCE_SCHEMA, SOURCE_TABLE)


def users_ddl() -> list[sql.Composed]:
    fired, func = q(USERS_SCHEMA, FIRED_TABLE), q(USERS_SCHEMA, "count_update")
    return [
        sql.SQL("CREATE TABLE {} (\n    {}\n)").format(USERS, sql.SQL(",\n    ").join(
            sql.SQL("{} {}").format(q(n), sql.SQL(t)) for n, t in USERS_COLUMNS)),
        sql.SQL("CREATE UNIQUE INDEX {} ON {} ({})").format(q(USERS_TABLE + "_key"), USERS,
                                                            sql.SQL(", ").join(map(q, USERS_KEY_INDEX))),
        sql.SQL("CREATE INDEX {} ON {} ({})").format(q(USERS_TABLE + "_by_query"), USERS,
                                                     sql.SQL(", ").join(map(q, USERS_INDEX))),
        sql.SQL("CREATE TABLE {} (n int)").format(fired),
        sql.SQL("CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN INSERT INTO {} VALUES (1);"
                " RETURN NEW; END $$").format(func, fired),
        sql.SQL("CREATE TRIGGER count_updates AFTER UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(USERS, func),
    ]


# ---- the engine, in a child process ----------------------------------------------------------------------------

def _from_offset(batches: Iterator[pa.RecordBatch], offset: int) -> Iterator[pa.RecordBatch]:
    for b in batches:
        if offset >= b.num_rows:
            offset -= b.num_rows
            continue
        yield b.slice(offset) if offset else b
        offset = 0


def engine_run(db: str, path: Path, streams: int = 2) -> dict[str, Any]:
    """One refresh of the adopted table through the product's own functions, as bench.contenders.bq_refresh
    drives them: plan, stage, quality gate, publish, audit. Returns the figures and each phase's wall time."""
    import pyarrow.parquet as pq
    from pydantic import SecretStr

    from blocks import BigQuerySource, PostgresTarget, Resources
    from bq_refresh.settings import Settings
    from tasks import sync
    from tasks.audit import finish_audit, start_audit
    from tasks.fastpath import LocalSource
    from tasks.registry import get_entry

    settings = Settings.model_validate({"REFRESH_STAGING_LOGGED": os.environ.get("REFRESH_STAGING_LOGGED", "false"),
                                        "BQ_REFRESH_DATABASE_URL": db, "BQ_REFRESH_SCHEMA": REGISTRY,
                                        "BQ_REFRESH_STAGING_SCHEMA": STAGING})
    res = Resources(source=BigQuerySource(project_id="local", dataset="bench"),
                    target=PostgresTarget(url=SecretStr(db)), settings=settings)
    parquet = pq.ParquetFile(path)

    def stream(part: int) -> Callable[[int], Iterator[pa.RecordBatch]]:
        return lambda offset: _from_offset(data.read(path, 8192, part=part, parts=streams), offset)

    local = LocalSource(parquet.schema_arrow, {f"part{p}": stream(p) for p in range(streams)},
                        estimated_rows=parquet.metadata.num_rows)
    phases: dict[str, float] = {}
    started = mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = round(now - mark, 2)
        mark = now

    with psycopg.connect(db, autocommit=True) as conn:
        entry = get_entry(conn, REGISTRY, f"{USERS_SCHEMA}.{USERS_TABLE}")
        audit_id = start_audit(conn, REGISTRY, config_id=entry.id, table_schema=USERS_SCHEMA, table_name=USERS_TABLE)
    plan = sync.plan_refresh(res, entry, local=local)
    lap("plan")
    manifest = sync.stage_rows(res, plan, audit_id=audit_id, local=local)
    lap("stage")
    if manifest.published is not None:
        result = manifest.published
    else:
        sync.check_staged(res, plan, audit_id=audit_id)
        lap("check")
        result = sync.publish(res, plan, audit_id=audit_id)
        lap("publish")
    with psycopg.connect(db, autocommit=True) as conn:
        finish_audit(conn, REGISTRY, audit_id, status="success", rows_processed=manifest.rows_read,
                     rows_inserted=result.rows_inserted, rows_updated=result.rows_updated,
                     rows_deleted=result.rows_deleted, metadata={"direct_load": manifest.published is not None,
                                                                 "rows_skipped_unchanged": manifest.rows_unchanged})
    return {"seconds": round(time.perf_counter() - started, 2), "phases": phases, "direct": manifest.published is not None,
            "hash_skip": plan.hash_skip, "rows_read": manifest.rows_read, "rows_staged": manifest.rows_staged,
            "skipped_by_hash": manifest.rows_unchanged, "inserted": result.rows_inserted,
            "updated": result.rows_updated, "deleted": result.rows_deleted, "unchanged": result.rows_unchanged}


def run_engine(db: str, path: Path, label: str) -> dict[str, Any]:
    """engine_run in a fresh process; its peak RSS from wait4 (this process's own reading of the file is not in it)."""
    out, err = STATE / f"{label}.out", STATE / f"{label}.err"
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "bench.adoption", "--engine-run", db, str(path)], cwd=ROOT,
                                stdout=fo, stderr=fe, env={**os.environ, "PYTHONPATH": str(ROOT)})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in out.read_text().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{label}: the engine failed (exit {proc.returncode}):\n{err.read_text()[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024)
    return result


# ---- the users' table and what PostgreSQL says about it ----------------------------------------------------------

def load_source(db: str, path: Path, rows: int, per_million: int) -> int:
    """The Parquet rows by COPY (ADBC) into a plain table in bench/data.py's types, each marked whether the users'
    copy will differ: a deterministic, evenly spread ``per_million`` of the rows. Returns how many differ."""
    import adbc_driver_postgresql.dbapi as adbc
    import pyarrow.parquet as pq

    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE CURRENT_USER SET TimeZone = {}").format(sql.Literal(ROLE_TIMEZONE)))
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(q(SOURCE_SCHEMA)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(q(SOURCE_SCHEMA)))
        for statement in data.create_table_sql(SOURCE_SCHEMA, SOURCE_TABLE, indexes=False):
            conn.execute(statement.encode())
        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} boolean NOT NULL").format(SOURCE, q(DIFFERS)))
    schema = pq.ParquetFile(path).schema_arrow.append(pa.field(DIFFERS, pa.bool_(), nullable=False))

    def marked() -> Iterator[pa.RecordBatch]:
        at = 0
        for b in data.read(path, 100_000):
            i = np.arange(at, at + b.num_rows, dtype=np.int64)
            at += b.num_rows
            yield pa.RecordBatch.from_arrays([*b.columns, pa.array((i + 1) * per_million // PER_MILLION
                                                                   > i * per_million // PER_MILLION)], schema=schema)
    with adbc.connect(db) as aconn:
        with aconn.cursor() as cur:
            cur.adbc_ingest(SOURCE_TABLE, pa.RecordBatchReader.from_batches(schema, marked()), mode="append",
                            db_schema_name=SOURCE_SCHEMA)
        aconn.commit()
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(SOURCE, sql.SQL(", ").join(map(q, data.KEY))))
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(SOURCE))
        got = conn.execute(sql.SQL("SELECT count(*), count(*) FILTER (WHERE {}) FROM {}").format(q(DIFFERS), SOURCE)).fetchone()
    assert got is not None and got[0] == rows, f"source holds {got} rows, not {rows}"
    return int(got[1])


def make_users_table(db: str) -> None:
    """The users' table, filled as their earlier manual sync left it (the marked rows with an older metric)."""
    with psycopg.connect(db, autocommit=True) as conn:
        for schema in (USERS_SCHEMA, REGISTRY, STAGING):
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(q(schema)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(q(USERS_SCHEMA)))
        create, *rest = users_ddl()
        conn.execute(create)
        values = []
        for n in SYNCED:
            col = sql.SQL("s.{}").format(q(n))
            if n in WALL_TIME:
                col = sql.SQL("({} AT TIME ZONE 'UTC')").format(col)
            if n == CHANGED_COLUMN:
                col = sql.SQL("CASE WHEN s.{} THEN {} + 1 ELSE {} END").format(q(DIFFERS), col, col)
            values.append(col)
        conn.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} s").format(
            USERS, sql.SQL(", ").join(map(q, SYNCED)), sql.SQL(", ").join(values), SOURCE))
        for statement in rest:
            conn.execute(statement)
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(USERS))


def register(db: str) -> None:
    from tasks.migrations import apply_migrations
    from tasks.registry import register_table

    with psycopg.connect(db, autocommit=True) as conn:
        apply_migrations(conn, REGISTRY, STAGING)
        register_table(conn, REGISTRY, f"{USERS_SCHEMA}.{USERS_TABLE}", {
            "source": "local", "key": data.KEY, "cursor": "updated_at", "mode": "full",
            # no BigQuery to count the source rows in; the checksum (hash sample) check runs
            "checks": {"row_count": False, "checksum": True}})


def sizes(conn: psycopg.Connection[Any], schema: str, table: str) -> tuple[int, int]:
    """(heap, heap + indexes + TOAST) in bytes."""
    row = conn.execute("SELECT pg_relation_size(c.oid), pg_total_relation_size(c.oid) FROM pg_class c"
                       " WHERE c.oid = to_regclass(%s)", (q(schema, table).as_string(conn),)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def updates(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """(n_tup_upd, n_tup_hot_upd) of the users' table, read afresh (not from this transaction's stats snapshot)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE schemaname = %s AND relname = %s",
                       (USERS_SCHEMA, USERS_TABLE)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def settled_updates(conn: psycopg.Connection[Any], at_least: int, timeout: float = 20.0) -> tuple[int, int]:
    """The update counters once they reach ``at_least`` and stop moving for 2 s (the engine's sessions report
    their statistics as they end), or whatever they say after ``timeout``."""
    deadline = time.monotonic() + timeout
    seen, since = updates(conn), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = updates(conn)
        if now != seen:
            seen, since = now, time.monotonic()
        elif seen[0] >= at_least and time.monotonic() - since >= 2.0:
            break
    return seen


def fired(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(q(USERS_SCHEMA, FIRED_TABLE))).fetchone()
    return int(row[0]) if row else 0


def shape(conn: psycopg.Connection[Any]) -> list[Any]:
    """The users' table as declared: columns (type, NOT NULL, default), indexes, triggers."""
    name = USERS.as_string(conn)
    columns = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid)"
        " FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum"
        " WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum", (name,)).fetchall()
    indexes = conn.execute("SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s ORDER BY 1",
                           (USERS_SCHEMA, USERS_TABLE)).fetchall()
    triggers = conn.execute("SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal"
                            " ORDER BY 1", (name,)).fetchall()
    return [columns, indexes, triggers]


def as_source(column: str) -> sql.Composable:
    """A users' column in the source's type: a wall time read as UTC, narrower types widened."""
    if column in WALL_TIME:
        return sql.SQL("(u.{} AT TIME ZONE 'UTC')").format(q(column))
    return sql.SQL("u.{}::{}").format(q(column), sql.SQL(SOURCE_TYPES[column]))


def differences(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """(rows of the users' table the source lacks, rows of the source the users' table lacks), value by value
    over every synced column, duplicates counted (EXCEPT ALL)."""
    theirs = sql.SQL("SELECT {} FROM {} u").format(sql.SQL(", ").join(as_source(n) for n in SYNCED), USERS)
    ours = sql.SQL("SELECT {} FROM {} s").format(sql.SQL(", ").join(sql.SQL("s.{}").format(q(n)) for n in SYNCED), SOURCE)
    out = []
    for left, right in ((theirs, ours), (ours, theirs)):
        row = conn.execute(sql.SQL("SELECT count(*) FROM ({} EXCEPT ALL {}) d").format(left, right)).fetchone()
        out.append(int(row[0]) if row else -1)
    return out[0], out[1]


def new_versions(conn: psycopg.Connection[Any], fill_xmin: str) -> tuple[int, int]:
    """(rows whose row version is newer than the fill's, of which the source marks as equal)."""
    key = sql.SQL(" AND ").join(sql.SQL("u.{} = s.{}").format(q(k), q(k)) for k in data.KEY)
    row = conn.execute(sql.SQL("SELECT count(*) FILTER (WHERE u.xmin::text <> %s),"
                               " count(*) FILTER (WHERE u.xmin::text <> %s AND NOT s.{}) FROM {} u JOIN {} s ON {}").format(
        q(DIFFERS), USERS, SOURCE, key), (fill_xmin, fill_xmin)).fetchone()
    return (int(row[0]), int(row[1])) if row else (-1, -1)


def staging_tables(conn: psycopg.Connection[Any]) -> list[str]:
    return [str(r[0]) for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1",
                                            (STAGING,)).fetchall()]


# ---- one repetition ------------------------------------------------------------------------------------------------

@dataclass
class Checks:
    """Each fact checked, and whether it held."""

    items: list[tuple[str, bool, str]] = field(default_factory=list)

    def expect(self, name: str, ok: bool, detail: Any) -> None:
        self.items.append((name, ok, str(detail)))
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}", file=sys.stderr)  # noqa: T201

    @property
    def failed(self) -> list[str]:
        return [f"{name}: {detail}" for name, ok, detail in self.items if not ok]


def repetition(db: str, path: Path, rows: int, differing: int, rep: int, checks: Checks) -> dict[str, Any]:
    from tasks.load import rowhash_table

    side = rowhash_table(USERS_SCHEMA, USERS_TABLE)
    make_users_table(db)
    out: dict[str, Any] = {}
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("SET work_mem = '256MB'")
        declared = shape(conn)
        got = conn.execute(sql.SQL("SELECT count(DISTINCT xmin::text), min(xmin::text), count(DISTINCT created_at),"
                                   " min(created_at) FROM {}").format(USERS)).fetchone()
        assert got is not None and got[0] == 1 and got[2] == 1, f"the fill was not one transaction: {got}"
        fill_xmin, fill_created = str(got[1]), got[3]
        out["size_before"] = sizes(conn, USERS_SCHEMA, USERS_TABLE)
        before = differences(conn)
        checks.expect("before: the users' table differs from the source in exactly the marked rows",
                      before == (differing, differing), f"{before[0]} rows theirs only, {before[1]} source only")
        upd0 = settled_updates(conn, 0, timeout=3)
        out["n_tup_upd_before"] = upd0[0]
    register(db)

    first = run_engine(db, path, f"rep{rep}-first")
    out["first"] = first
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("SET work_mem = '256MB'")
        upd1 = settled_updates(conn, upd0[0] + differing)
        out["first"].update(fired=fired(conn), n_tup_upd=upd1[0] - upd0[0], n_tup_hot_upd=upd1[1] - upd0[1],
                            size_after=sizes(conn, USERS_SCHEMA, USERS_TABLE), side_size=sizes(conn, STAGING, side),
                            new_versions=new_versions(conn, fill_xmin))
        side_rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(q(STAGING, side))).fetchone()
        out["first"]["side_rows"] = int(side_rows[0]) if side_rows else 0
        after = differences(conn)
        f = out["first"]
        checks.expect("first run: the users' table equals the source value by value", after == (0, 0),
                      f"{after[0]} rows theirs only, {after[1]} source only")
        checks.expect("first run: rows updated as reported = rows that differ", f["updated"] == differing,
                      f"updated {f['updated']}, differing {differing}")
        checks.expect("first run: nothing inserted or deleted", (f["inserted"], f["deleted"]) == (0, 0),
                      f"inserted {f['inserted']}, deleted {f['deleted']}")
        checks.expect("first run: the update trigger fired once per differing row", f["fired"] == differing,
                      f"fired {f['fired']}")
        checks.expect("first run: n_tup_upd grew by the differing rows", f["n_tup_upd"] == differing,
                      f"n_tup_upd +{f['n_tup_upd']} (HOT {f['n_tup_hot_upd']})")
        checks.expect("first run: new row versions exactly on the differing rows",
                      f["new_versions"] == (differing, 0),
                      f"{f['new_versions'][0]} rows with a new xmin, {f['new_versions'][1]} of them equal in the source")
        checks.expect("first run: a row hash per row, in the staging schema's side table", f["side_rows"] == rows,
                      f"{f['side_rows']} hashes in {STAGING}.{side}")
        checks.expect("first run: nothing left in staging but the side table", staging_tables(conn) == [side],
                      staging_tables(conn))
        checks.expect("the users' DDL, indexes and trigger untouched", shape(conn) == declared,
                      "same" if shape(conn) == declared else shape(conn))
        own = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE created_at IS DISTINCT FROM %s").format(USERS),
                           (fill_created,)).fetchone()
        checks.expect("their own created_at column untouched", own == (0,), f"{own[0] if own else '?'} rows changed")

    second = run_engine(db, path, f"rep{rep}-second")
    out["second"] = second
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("SET work_mem = '256MB'")
        upd2 = settled_updates(conn, upd1[0], timeout=5)
        s = out["second"]
        s.update(fired=fired(conn) - out["first"]["fired"], n_tup_upd=upd2[0] - upd1[0],
                 size_after=sizes(conn, USERS_SCHEMA, USERS_TABLE), side_size=sizes(conn, STAGING, side))
        checks.expect("second run: every row skipped by hash", s["skipped_by_hash"] == rows and s["rows_staged"] == 0,
                      f"skipped {s['skipped_by_hash']} of {rows}, staged {s['rows_staged']}")
        checks.expect("second run: nothing written", (s["inserted"], s["updated"], s["deleted"], s["fired"],
                                                     s["n_tup_upd"]) == (0, 0, 0, 0, 0),
                      f"inserted {s['inserted']}, updated {s['updated']}, deleted {s['deleted']}, fired {s['fired']},"
                      f" n_tup_upd +{s['n_tup_upd']}")
        again = differences(conn)
        checks.expect("second run: the users' table still equals the source", again == (0, 0),
                      f"{again[0]} rows theirs only, {again[1]} source only")
    return out


# ---- the report -----------------------------------------------------------------------------------------------------

def mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def growth(before: int, after: int) -> str:
    return f"{mb(before)} → {mb(after)} ({(after - before) / before * 100:+.2f}%)" if before else "n/a"


def render(info: dict[str, Any], reps: list[dict[str, Any]], checks: Checks) -> str:
    r, first, second = reps[0], reps[0]["first"], reps[0]["second"]
    rows, differing = info["rows"], info["differing"]

    def secs(run: str) -> str:
        values = [x[run]["seconds"] for x in reps]
        each = f" (each: {', '.join(f'{v:.2f}' for v in values)})" if len(values) > 1 else ""
        return f"{statistics.median(values):.2f} s{each}"

    phases = ", ".join(f"{k} {v:.2f}" for k, v in first["phases"].items())
    table = [
        ("Rows in the users' table (and the source)", f"{rows:,}"),
        ("Rows differing from the source (`impressions_total` one higher)",
         f"{differing:,} ({differing / rows * 100:.2f}%)"),
        ("**First run** wall time" + (" (median)" if len(reps) > 1 else ""), f"{secs('first')}; phases: {phases} s"),
        ("First run: rows read / staged", f"{first['rows_read']:,} / {first['rows_staged']:,}"),
        ("First run: inserted / updated / deleted / unchanged",
         f"{first['inserted']:,} / {first['updated']:,} / {first['deleted']:,} / {first['unchanged']:,}"),
        ("First run: rows rewritten (new xmin) / of them equal in the source",
         f"{first['new_versions'][0]:,} / {first['new_versions'][1]:,}"),
        ("First run: AFTER UPDATE trigger fires", f"{first['fired']:,}"),
        ("First run: n_tup_upd delta (HOT)", f"{first['n_tup_upd']:,} ({first['n_tup_hot_upd']:,})"),
        ("Users' table heap (pg_relation_size) before → after", growth(r["size_before"][0], first["size_after"][0])),
        ("Users' table total (pg_total_relation_size) before → after",
         growth(r["size_before"][1], first["size_after"][1])),
        (f"Side table of row hashes (`{STAGING}`), total size / rows",
         f"{mb(first['side_size'][1])} / {first['side_rows']:,}"),
        ("First run: peak RSS of the engine's process", f"{first['peak_rss_mb']} MB"),
        ("**Second run** wall time" + (" (median)" if len(reps) > 1 else ""), secs("second")),
        ("Second run: skipped by hash / staged", f"{second['skipped_by_hash']:,} / {second['rows_staged']:,}"),
        ("Second run: inserted / updated / deleted / trigger fires / n_tup_upd delta",
         f"{second['inserted']} / {second['updated']} / {second['deleted']} / {second['fired']} / {second['n_tup_upd']}"),
        ("Second run: users' table total size after", mb(second["size_after"][1])),
        ("Second run: peak RSS of the engine's process", f"{second['peak_rss_mb']} MB"),
    ]
    lines = [
        "# Adopting an existing table",
        "",
        "What happens when a user registers an SQP table that already exists in their PostgreSQL, made with their "
        "own DDL and filled by an earlier manual sync, and bq-refresh runs over it for the first time: the first run "
        "should rewrite only the rows that really differ from the source (no bloat; an update trigger fires only "
        "for those) and fill the row hashes (a side table in the staging schema, not a column of the users' table); "
        "the second run should skip every unchanged row by hash.",
        "",
        f"Produced by `{info['command']}` on {info['when']} (commit {info['commit']}).",
        "",
        f"Machine: {info['cpus']} CPU cores (`nproc`), {info['memory_gb']} GB RAM, PostgreSQL {info['server']} "
        f"(default durability, started by `bench.run.start_pg15`), Python {info['python']}. Load average (1 min) "
        f"at the start / end: {info['load'][0]:.2f} / {info['load'][1]:.2f}.",
        "",
    ]
    if info.get("note"):
        lines += [f"**Note:** {info['note']}", ""]
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in table], ""]
    lines += [
        "How it is measured: the source is bench/data.py's SQP data (29 columns, key start_date, asin, search_query) "
        "as a Parquet file; the engine reads it in-process through `tasks.fastpath.LocalSource` with 2 streams, "
        "as bench/contenders.py does (`plan_refresh`, `stage_rows`, `check_staged`, `publish`; mode `full`, row "
        "count check off: no BigQuery to count in), each run in a process of its own (wall time measured inside it "
        "after imports; peak RSS from wait4). The users' table is filled from the same rows (COPY into a plain "
        "table, then INSERT ... SELECT into their types), the differing rows' `impressions_total` one higher, then "
        f"VACUUM ANALYZE. The role's sessions default to TimeZone {ROLE_TIMEZONE} (the wall times must not depend "
        "on it). Sizes are read right after each run (no VACUUM in between).",
        "",
        "The users' DDL (their column order, narrower types, a unique index instead of a primary key, a secondary "
        "index, a column of their own, an AFTER UPDATE trigger counting into a small table):",
        "",
        "```sql",
        *[f"{s};" for s in info["ddl"]],
        "```",
        "",
        "Checked without the product's code after each run (EXCEPT ALL both ways between the users' table, its "
        "columns read in the source's types with the wall time read as UTC, and the Parquet rows COPY'd into a "
        "plain table; rows with a new xmin against the rows marked differing):",
        "",
        *[f"- {'ok' if ok else '**FAILED**'}: {name} ({detail})" for name, ok, detail in checks.items[:len(checks.items)
                                                                                                   // len(reps)]],
        "",
    ]
    if len(reps) > 1:
        lines += [f"Every check ran in each of the {len(reps)} repetitions; "
                  + ("all held." if not checks.failed else f"{len(checks.failed)} failed in all."), ""]
    return "\n".join(lines)


def machine_info(db: str, args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    with psycopg.connect(db) as conn:
        server = conn.execute("SHOW server_version").fetchone()
        ddl = [s.as_string(conn) for s in users_ddl()]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "HEAD", "--name-only"], cwd=ROOT, capture_output=True,
                           text=True).stdout.split()
    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30),
            "server": server[0] if server else "?", "python": platform.python_version(), "ddl": ddl,
            "commit": commit + (f" with uncommitted changes to {', '.join(dirty)}" if dirty else ""),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "note": args.note,
            "command": " ".join([".venv/bin/python -m bench.adoption", *map(shlex.quote, sys.argv[1:])])}


def main() -> None:
    if sys.argv[1:2] == ["--engine-run"]:
        print(json.dumps(engine_run(sys.argv[2], Path(sys.argv[3]))))  # noqa: T201
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--differ", type=float, default=0.01, help="fraction of the rows the users' copy differs in")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--note", default=None, help="a sentence for the page (e.g. how busy the machine was)")
    parser.add_argument("--out", type=Path, default=DOC)
    args = parser.parse_args()
    if not 0 <= args.differ <= 1 or args.rows < 1 or args.repeat < 1:
        parser.error("--differ must be within [0, 1], --rows and --repeat at least 1")
    from bench.run import start_pg15, stop_pg15

    STATE.mkdir(parents=True, exist_ok=True)
    path = data.write(DATA_CACHE / f"sqp_initial_{args.rows}.parquet", args.rows, changed=False)
    load = [os.getloadavg()[0]]
    db = start_pg15(STATE)
    if db is None:
        sys.exit("PostgreSQL 15 is not installed (/usr/lib/postgresql/15/bin): this benchmark needs it")
    checks = Checks()
    try:
        info = {**machine_info(db, args), "rows": args.rows}
        info["differing"] = load_source(db, path, args.rows, round(args.differ * PER_MILLION))
        reps = []
        for rep in range(args.repeat):
            print(f"repetition {rep + 1} of {args.repeat}", file=sys.stderr)  # noqa: T201
            reps.append(repetition(db, path, args.rows, info["differing"], rep + 1, checks))
            (STATE / "results.json").write_text(json.dumps(reps, indent=1, default=str))
    finally:
        stop_pg15(STATE)
    load.append(os.getloadavg()[0])
    info["load"] = load
    page = render(info, reps, checks)
    args.out.write_text(page)
    print(page)  # noqa: T201
    if checks.failed:
        print("FAILED:\n" + "\n".join(checks.failed), file=sys.stderr)  # noqa: T201
        sys.exit(1)


if __name__ == "__main__":
    main()
