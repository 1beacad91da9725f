"""One contender, one phase, in its own process (so its peak RSS is its own):

    python -m bench.contenders NAME PHASE --db URL --file data.parquet --schema S --table T

Prints {"seconds": ..., "rows": ...} as the last line. The target table already exists (same columns,
primary key and index for everyone) and holds the initial data before a reload.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import bq_refresh as _arrow_pool  # noqa: F401 - first: the Arrow memory pool bq-refresh runs with, for every contender
from bench.data import COLUMNS, INDEX, KEY, read

NON_KEY = [n for n, _ in COLUMNS if n not in KEY]


def q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _adbc_copy(db: str, schema: str, table: str, path: Path, *, limit: int | None = None) -> int:
    """One binary COPY of the whole file through ADBC (the fastest way in from Arrow)."""
    import adbc_driver_postgresql.dbapi as adbc
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema_ = pq.ParquetFile(path).schema_arrow
    batches = read(path)
    if limit is not None:
        def limited() -> Any:
            left = limit
            for b in batches:
                if left <= 0:
                    return
                yield b.slice(0, left)
                left -= b.num_rows
        batches = limited()
    with adbc.connect(db) as conn:
        with conn.cursor() as cur:
            n = cur.adbc_ingest(table, pa.RecordBatchReader.from_batches(schema_, batches), mode="append",
                                db_schema_name=schema)
        conn.commit()
    return int(n)


def copy_then_index(db: str, schema: str, table: str, path: Path, phase: str) -> int:
    """Reference: COPY into a table without indexes, then add the primary key and the index."""
    import psycopg

    assert phase == "initial", "a reference for the initial load only"
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {q(schema)}.{q(table)} DROP CONSTRAINT {q(table + '_pkey')}")
        conn.execute(f"DROP INDEX {q(schema)}.{q(table + '_asin_start_date_idx')}")
    n = _adbc_copy(db, schema, table, path)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f"ALTER TABLE {q(schema)}.{q(table)} ADD PRIMARY KEY ({', '.join(KEY)})")
        conn.execute(f"CREATE INDEX ON {q(schema)}.{q(table)} ({', '.join(INDEX)})")
    return n


def staged_upsert(db: str, schema: str, table: str, path: Path, phase: str) -> int:
    """Reference: COPY into an UNLOGGED staging table, then INSERT ... ON CONFLICT into the indexed target
    (guarded by IS DISTINCT FROM on a reload, so unchanged rows are not rewritten)."""
    import psycopg

    stage = table + "_stage"
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {q(schema)}.{q(stage)}")
        conn.execute(f"CREATE UNLOGGED TABLE {q(schema)}.{q(stage)} (LIKE {q(schema)}.{q(table)})")
    n = _adbc_copy(db, schema, stage, path)
    cols = ", ".join(q(c) for c, _ in COLUMNS)
    sets = ", ".join(f"{q(c)} = EXCLUDED.{q(c)}" for c in NON_KEY)
    guard = ""
    if phase == "reload":
        guard = (f" WHERE ({', '.join('t.' + q(c) for c in NON_KEY)}) IS DISTINCT FROM"
                 f" ({', '.join('EXCLUDED.' + q(c) for c in NON_KEY)})")
    with psycopg.connect(db) as conn:
        conn.execute(f"INSERT INTO {q(schema)}.{q(table)} AS t ({cols}) SELECT {cols} FROM {q(schema)}.{q(stage)}"
                     f" ON CONFLICT ({', '.join(KEY)}) DO UPDATE SET {sets}{guard}")
        conn.execute(f"DROP TABLE {q(schema)}.{q(stage)}")
        conn.commit()
    return n


def bq_refresh(db: str, schema: str, table: str, path: Path, phase: str, streams: int = 2) -> int:
    """bq-refresh's own path from Arrow batches to published rows: the registry, a plan with its checkpoint,
    staging (or the direct load), the quality gate (checksum round trip; no BigQuery row count here),
    the publish, the watermark and the audit row."""
    import psycopg
    import pyarrow.parquet as pq

    from blocks import BigQuerySource, PostgresTarget, Resources
    from bq_refresh.settings import Settings
    from tasks import sync
    from tasks.audit import finish_audit, start_audit
    from tasks.fastpath import LocalSource
    from tasks.registry import get_entry

    settings = Settings.model_validate({"REFRESH_STAGING_LOGGED": os.environ.get("REFRESH_STAGING_LOGGED", "false"),
                                        "BQ_REFRESH_DATABASE_URL": db, "BQ_REFRESH_SCHEMA": schema + "_reg",
                                        "BQ_REFRESH_STAGING_SCHEMA": schema + "_staging"})
    res = Resources(source=BigQuerySource(project_id="local", dataset="bench"), target=PostgresTarget(url=db),
                    settings=settings)
    reg = settings.schema_name
    with psycopg.connect(db, autocommit=True) as conn:
        entry = get_entry(conn, reg, f"{schema}.{table}")
        audit_id = start_audit(conn, reg, config_id=entry.id, table_schema=schema, table_name=table)
    local = LocalSource(pq.ParquetFile(path).schema_arrow,
                        {f"part{p}": (lambda offset, p=p: _skip(read(path, 8192, part=p, parts=streams), offset))
                         for p in range(streams)},
                        estimated_rows=pq.ParquetFile(path).metadata.num_rows)
    plan = sync.plan_refresh(res, entry, local=local)
    manifest = sync.stage_rows(res, plan, audit_id=audit_id, local=local)
    if manifest.published is not None:
        result = manifest.published
    else:
        sync.check_staged(res, plan, audit_id=audit_id)
        result = sync.publish(res, plan, audit_id=audit_id)
    with psycopg.connect(db, autocommit=True) as conn:
        finish_audit(conn, reg, audit_id, status="success", rows_processed=manifest.rows_read,
                     rows_inserted=result.rows_inserted, rows_updated=result.rows_updated,
                     rows_deleted=result.rows_deleted, metadata={"direct_load": manifest.published is not None,
                                                                 "rows_skipped_unchanged": manifest.rows_unchanged})
    print(json.dumps({"direct": manifest.published is not None, "skipped": manifest.rows_unchanged,  # noqa: T201
                      "inserted": result.rows_inserted, "updated": result.rows_updated,
                      "deleted": result.rows_deleted}), file=sys.stderr)
    return manifest.rows_read


def _skip(batches: Any, offset: int) -> Any:
    for b in batches:
        if offset >= b.num_rows:
            offset -= b.num_rows
            continue
        yield b.slice(offset) if offset else b
        offset = 0


def dlt_best(db: str, schema: str, table: str, path: Path, phase: str) -> int:
    """dlt at its best: parquet through ADBC, merge strategy upsert with skip_unchanged_rows, the data
    split into 4 files loaded by 4 workers."""
    import dlt
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(path).metadata.num_rows
    os.environ["NORMALIZE__DATA_WRITER__FILE_MAX_ITEMS"] = str(rows // 4 + 1)
    os.environ["LOAD__WORKERS"] = "4"
    os.environ["NORMALIZE__WORKERS"] = "1"

    @dlt.resource(name=table, primary_key=KEY,
                  write_disposition={"disposition": "merge", "strategy": "upsert", "skip_unchanged_rows": True})
    def source() -> Any:
        yield from read(path, 100_000)

    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(db)
    if parts.password is None:  # dlt insists on a password; the benchmark's server trusts local logins
        parts = parts._replace(netloc=f"{parts.username}:unused@{parts.hostname}:{parts.port}")
    pipeline = dlt.pipeline(pipeline_name=f"bench_{schema}",
                            destination=dlt.destinations.postgres(credentials=urlunsplit(parts)),
                            dataset_name=schema, pipelines_dir=os.environ.get("BENCH_DLT_DIR", "/tmp/bench-dlt"))
    pipeline.run(source(), loader_file_format="parquet")
    return rows


def sling_upsert(db: str, schema: str, table: str, path: Path, phase: str) -> int:
    """Sling's incremental upsert from the Parquet file (its own binary, run as the CLI)."""
    import subprocess

    import pyarrow.parquet as pq
    import sling_linux_amd64  # the binary wheel: the `sling` package alone downloads its binary at run time

    binary = Path(sling_linux_amd64.__file__).parent / "bin" / "sling-linux-amd64"
    # Offline, Sling reads Parquet through the duckdb-cli package's binary; DuckDB's json extension is built
    # into that binary, and a placeholder file stops Sling from trying to download it.
    home = Path(os.environ.get("BENCH_SLING_HOME", "/tmp/bench-sling"))
    duckdb = Path(sys.executable).parent / "duckdb"
    version = subprocess.run([str(duckdb), "--version"], capture_output=True, text=True).stdout.split()[0]
    placeholder = home / ".duckdb" / "extensions" / version / "linux_amd64" / "json.duckdb_extension"
    placeholder.parent.mkdir(parents=True, exist_ok=True)
    placeholder.touch()
    url = db + ("&" if "?" in db else "?") + "sslmode=disable"
    env = {**os.environ, "BENCH_PG": url, "DUCKDB_PATH": str(duckdb), "HOME": str(home), "SLING_HOME_DIR": str(home / ".sling")}
    cmd = [str(binary), "run", "--src-stream", f"file://{path}", "--tgt-conn", "BENCH_PG",
           "--tgt-object", f"{schema}.{table}", "--mode", "incremental", "--primary-key", ",".join(KEY)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"sling failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
    return int(pq.ParquetFile(path).metadata.num_rows)


BASELINE_ROWS = 100_000


def psycopg_executemany(db: str, schema: str, table: str, path: Path, phase: str) -> int:
    """The naive baseline: rows as Python tuples, INSERT ... ON CONFLICT DO UPDATE via executemany."""
    import psycopg

    rows: list[tuple[Any, ...]] = []
    for b in read(path):
        rows += [tuple(r.values()) for r in b.to_pylist()]
        if len(rows) >= BASELINE_ROWS:
            break
    rows = rows[:BASELINE_ROWS]
    cols = ", ".join(q(c) for c, _ in COLUMNS)
    marks = ", ".join(["%s"] * len(COLUMNS))
    sets = ", ".join(f"{q(c)} = EXCLUDED.{q(c)}" for c in NON_KEY)
    with psycopg.connect(db) as conn, conn.cursor() as cur:
        cur.executemany(f"INSERT INTO {q(schema)}.{q(table)} ({cols}) VALUES ({marks})"
                        f" ON CONFLICT ({', '.join(KEY)}) DO UPDATE SET {sets}", rows)
        conn.commit()
    return len(rows)


def pandas_to_sql(db: str, schema: str, table: str, path: Path, phase: str) -> int:
    """The naive baseline: a DataFrame's to_sql(method='multi'), at the largest chunk PostgreSQL's 65535
    parameters allow; an upsert (ON CONFLICT) through to_sql's method hook for the reload."""
    import pyarrow as pa
    import sqlalchemy as sa
    from sqlalchemy.dialects.postgresql import insert

    frame = pa.Table.from_batches(list(_take(read(path), BASELINE_ROWS))).to_pandas()
    engine = sa.create_engine(db.replace("postgresql://", "postgresql+psycopg://", 1))

    target = sa.Table(table, sa.MetaData(), schema=schema, autoload_with=engine)  # the real column types

    def upsert(pd_table: Any, conn: Any, keys: list[str], data_iter: Any) -> int:
        stmt = insert(target).values([dict(zip(keys, row, strict=True)) for row in data_iter])
        stmt = stmt.on_conflict_do_update(index_elements=KEY, set_={c: stmt.excluded[c] for c in NON_KEY})
        return int(conn.execute(stmt).rowcount)

    chunk = 65535 // len(COLUMNS) - 1
    frame.to_sql(table, engine, schema=schema, if_exists="append", index=False, chunksize=chunk,
                 method=upsert)
    return len(frame)


def _take(batches: Any, n: int) -> Any:
    for b in batches:
        if n <= 0:
            return
        yield b.slice(0, n)
        n -= b.num_rows


CONTENDERS = {
    "copy_then_index": copy_then_index, "staged_upsert": staged_upsert, "bq_refresh": bq_refresh,
    "dlt": dlt_best, "sling": sling_upsert, "psycopg_executemany": psycopg_executemany,
    "pandas_to_sql": pandas_to_sql,
}


# Imported before the clock starts: start-up is not what is measured.
PREIMPORT = {
    "bq_refresh": ["tasks.sync", "tasks.fastpath", "tasks.registry", "tasks.audit", "blocks", "adbc_driver_postgresql.dbapi"],
    "dlt": ["dlt", "dlt.destinations"], "pandas_to_sql": ["pandas", "sqlalchemy", "sqlalchemy.dialects.postgresql"],
    "copy_then_index": ["adbc_driver_postgresql.dbapi", "psycopg"], "staged_upsert": ["adbc_driver_postgresql.dbapi", "psycopg"],
    "psycopg_executemany": ["psycopg"], "sling": [],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name", choices=sorted(CONTENDERS))
    parser.add_argument("phase", choices=["initial", "reload"])
    parser.add_argument("--db", required=True)
    parser.add_argument("--file", required=True, type=Path)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--table", required=True)
    args = parser.parse_args()
    import importlib

    for module in PREIMPORT[args.name]:
        importlib.import_module(module)
    started = time.perf_counter()
    rows = CONTENDERS[args.name](args.db, args.schema, args.table, args.file, args.phase)
    print(json.dumps({"seconds": time.perf_counter() - started, "rows": rows}))  # noqa: T201


if __name__ == "__main__":
    main()
