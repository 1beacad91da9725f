"""The benchmark: bq-refresh against hand-written references, dlt, Sling and naive baselines, back to back
against the same PostgreSQL, each repeated (median reported); Storage Read extraction with 1 and 4 streams;
peak RSS at 1M and 10M rows. Writes docs/benchmarks.md and docs/benchmarks.png.

    ./dev bench                 # 1M rows, 3 repetitions (PostgreSQL 15 started here when installed)
    ./dev bench --big           # also bq-refresh's initial load of 10M rows (memory)
    ./dev bench --rows 200000 --repeat 1 --skip sling,dlt   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from bench import data

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".state" / "bench"
DOCS = ROOT / "docs"
FULL = ["copy_then_index", "staged_upsert", "bq_refresh", "dlt", "sling"]
BASELINES = ["psycopg_executemany", "pandas_to_sql"]
COMPETITORS = {"dlt", "sling", "pandas_to_sql"}  # run in the benchmark's own virtualenv (.venv-bench)


def start_pg15(state: Path) -> str | None:
    """A PostgreSQL 15 cluster with default durability in ``state``, on a free port; None if not installed."""
    from bq_refresh.services import free_port

    bin_dir = Path("/usr/lib/postgresql/15/bin")
    if not (bin_dir / "initdb").exists():
        return None
    data_dir, port = state / "pg15", free_port()
    runas: list[str] = []
    if os.getuid() == 0:
        subprocess.run(["bash", "-c", "id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres"], check=True)
        runas = ["runuser", "-u", "postgres", "--"]
    subprocess.run(["rm", "-rf", str(data_dir)], check=True)
    data_dir.mkdir(parents=True)
    if runas:
        subprocess.run(["chown", "postgres", str(data_dir)], check=True)
    subprocess.run([*runas, str(bin_dir / "initdb"), "-D", str(data_dir / "data"), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*runas, str(bin_dir / "pg_ctl"), "-D", str(data_dir / "data"), "-l", str(data_dir / "log"), "-w",
                    "-o", f"-p {port} -k /tmp -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def stop_pg15(state: Path) -> None:
    runas = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    subprocess.run([*runas, "/usr/lib/postgresql/15/bin/pg_ctl", "-D", str(state / "pg15" / "data"), "-m", "fast",
                    "stop"], capture_output=True)


def prepare(db: str, name: str, schema: str, table: str) -> None:
    """A fresh schema with the target (same columns, key and index for every contender)."""
    with psycopg.connect(db, autocommit=True) as conn:
        for s in (schema, schema + "_reg", schema + "_staging"):
            conn.execute(f'DROP SCHEMA IF EXISTS "{s}" CASCADE')
        conn.execute(f'CREATE SCHEMA "{schema}"')
        for statement in data.create_table_sql(schema, table):
            conn.execute(statement)
        if name == "bq_refresh":
            from tasks.migrations import apply_migrations
            from tasks.registry import register_table

            apply_migrations(conn, schema + "_reg")
            register_table(conn, schema + "_reg", f"{schema}.{table}", {
                "source": "local", "key": data.KEY, "cursor": "updated_at", "mode": "window",
                "window_column": "start_date", "checks": {"row_count": False, "checksum": True}})


def run_child(python: str, name: str, phase: str, db: str, path: Path, schema: str, table: str) -> dict[str, Any]:
    """Run one contender in its own process; wall time measured inside it, peak RSS from wait4."""
    cmd = [python, "-m", "bench.contenders", name, phase, "--db", db, "--file", str(path), "--schema", schema,
           "--table", table]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_DLT_DIR": str(STATE / "dlt" / uuid.uuid4().hex[:8])}
    venv_bin = str(Path(python).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        return {"error": (err or out)[-1500:]}
    result = json.loads(out.strip().splitlines()[-1])
    # This process (see ``isolated``) has had exactly one child: RUSAGE_CHILDREN's peak is that contender's
    # (its own children included, e.g. Sling's binary).
    import resource

    result["rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    info = [line for line in err.splitlines() if line.startswith("{")]
    if info:
        result["info"] = json.loads(info[-1])
    return result


def isolated(args: list[str]) -> dict[str, Any]:
    """Run ``bench.run --one ...`` in a fresh process so RUSAGE_CHILDREN is that contender's alone."""
    done = subprocess.run([sys.executable, "-m", "bench.run", "--one", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=7200)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout)[-1500:]}
    return dict(json.loads(lines[-1]))


def one(argv: list[str]) -> None:
    python, name, phase, db, path, schema, table = argv
    print(json.dumps(run_child(python, name, phase, db, Path(path), schema, table)))  # noqa: T201


def extraction(rows_path: Path, rows: int) -> dict[str, Any]:
    """Rows/s through the emulator's Storage Read API with 1 and 4 streams (the emulator is not BigQuery)."""
    import pyarrow as pa
    from google.cloud import bigquery

    from blocks import BigQuerySource
    from bq_refresh.services import start_emulator, stop_emulator
    from tasks import extract

    state = STATE / "emulator"
    ep = start_emulator(state, "bench-project", persistent=False, reuse=False)
    try:
        src = BigQuerySource(project_id="bench-project", dataset="bench", api_endpoint=ep.rest_url,
                             storage_endpoint=ep.grpc_target, timeout_s=600)
        client = src.get_bigquery_client()
        client.create_dataset("bench", exists_ok=True)
        ref = src.table_ref("sqp")
        import pyarrow.parquet as pq

        kinds = [(pa.types.is_date, "DATE"), (pa.types.is_string, "STRING"), (pa.types.is_integer, "INT64"),
                 (pa.types.is_decimal, "NUMERIC"), (pa.types.is_timestamp, "TIMESTAMP")]
        fields = [bigquery.SchemaField(f.name, next(k for test, k in kinds if test(f.type)))
                  for f in pq.ParquetFile(rows_path).schema_arrow]
        client.create_table(bigquery.Table(ref, schema=fields), exists_ok=True)
        t = time.perf_counter()
        with rows_path.open("rb") as fh:  # a resumable upload (the emulator refuses multipart ones)
            client.load_table_from_file(fh, ref, job_config=bigquery.LoadJobConfig(
                source_format="PARQUET", write_disposition="WRITE_APPEND")).result(timeout=1800)
        load_s = time.perf_counter() - t
        from tasks.sources import resolve_source

        table = resolve_source(src, table="bench", source_ref="sqp", query=None)
        out: dict[str, Any] = {"rows": rows, "emulator_load_seconds": round(load_s, 1)}
        for streams in (1, 4):
            from datetime import UTC, datetime

            info = extract.create_session(src, table, selected_fields=[f.name for f in table.fields], row_restriction="",
                                          snapshot_time=datetime.now(UTC), max_streams=streams, table_name="bench")
            schema = pa.ipc.read_schema(pa.py_buffer(info.arrow_schema))
            t = time.perf_counter()
            from concurrent.futures import ThreadPoolExecutor

            def drain(stream: str, schema: pa.Schema = schema) -> int:
                return sum(b.num_rows for b, _ in extract.read_stream(src.get_read_client(), stream, 0, schema,
                                                                      table_name="bench", server_offsets=False))
            with ThreadPoolExecutor(len(info.streams)) as pool:
                got = sum(pool.map(drain, info.streams))
            secs = time.perf_counter() - t
            out[f"streams_{streams}"] = {"streams_granted": len(info.streams), "rows": got, "seconds": round(secs, 2),
                                         "rows_per_s": round(got / secs)}
        return out
    finally:
        stop_emulator(state)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--big", action="store_true", help="also bq-refresh's initial load of 10M rows (peak RSS)")
    parser.add_argument("--skip", default="", help="comma-separated contenders to leave out")
    parser.add_argument("--no-extraction", action="store_true")
    parser.add_argument("--db", default=os.environ.get("BENCH_DATABASE_URL"))
    parser.add_argument("--bench-python", default=str(ROOT / ".venv-bench" / "bin" / "python"))
    parser.add_argument("--out", default=str(DOCS / "benchmarks.md"))
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    STATE.mkdir(parents=True, exist_ok=True)
    db = args.db or start_pg15(STATE)
    started_pg = args.db is None and db is not None
    if db is None:
        from bq_refresh.services import start_embedded_postgres

        db = start_embedded_postgres(STATE)
    try:
        results = run_all(args, db, skip)
    finally:
        if started_pg:
            stop_pg15(STATE)
    (STATE / "results.json").write_text(json.dumps(results, indent=2, default=str))
    from bench.report import render

    render(results, Path(args.out))
    print(json.dumps(results["summary"], indent=2))  # noqa: T201


def run_all(args: argparse.Namespace, db: str, skip: set[str]) -> dict[str, Any]:
    rows = args.rows
    files = {phase: data.write(STATE / f"sqp_{phase}_{rows}.parquet", rows, changed=phase == "reload")
             for phase in ("initial", "reload")}
    small = {phase: data.write(STATE / f"sqp_{phase}_{data_rows(rows)}.parquet", data_rows(rows), changed=phase == "reload")
             for phase in ("initial", "reload")}
    bench_py = args.bench_python if Path(args.bench_python).exists() else sys.executable
    with psycopg.connect(db) as conn:
        server = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rep in range(args.repeat):
        for name in FULL + BASELINES:
            if name in skip or (name in BASELINES and rep > 0):  # the naive baselines run once: minutes each
                continue
            python = bench_py if name in COMPETITORS else sys.executable
            schema, table = f"bench_{name}", "sqp"
            prepare(db, name, schema, table)
            paths = small if name in BASELINES else files
            for phase in ("initial", "reload"):
                if name == "copy_then_index" and phase == "reload":
                    continue
                result = isolated([python, name, phase, db, str(paths[phase]), schema, table])
                runs.setdefault(name, {}).setdefault(phase, []).append(result)
                (STATE / "runs.json").write_text(json.dumps(runs, indent=1, default=str))  # kept if a later step fails
                print(f"rep {rep + 1} {name} {phase}: {result}", file=sys.stderr)  # noqa: T201
    summary: dict[str, Any] = {}
    for name, phases in runs.items():
        for phase, items in phases.items():
            ok = [r for r in items if "seconds" in r]
            if not ok:
                summary.setdefault(name, {})[phase] = {"error": items[-1].get("error", "")[-600:]}
                continue
            secs = statistics.median(r["seconds"] for r in ok)
            summary.setdefault(name, {})[phase] = {
                "seconds": round(secs, 2), "rows": ok[0]["rows"], "rows_per_s": round(ok[0]["rows"] / secs),
                "peak_rss_mb": round(max(r["rss_mb"] for r in ok)), "runs": [round(r["seconds"], 2) for r in ok],
                "info": ok[-1].get("info"),
            }
    extra: dict[str, Any] = {}
    if args.big and "bq_refresh" not in skip:
        try:
            extra["bq_refresh_10m_initial"] = big_run(db)
        except Exception as exc:  # noqa: BLE001 - reported in the page, the rest is kept
            extra["bq_refresh_10m_initial"] = {"error": repr(exc)[-1500:]}
    if not args.no_extraction:
        try:
            extra["extraction"] = extraction(files["initial"], rows)
        except Exception as exc:  # noqa: BLE001
            extra["extraction"] = {"error": repr(exc)[-1500:]}
    return {"summary": summary, "extra": extra, "rows": rows, "repeat": args.repeat, "server": server,
            "machine": machine(), "versions": versions(bench_py), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def big_run(db: str) -> dict[str, Any]:
    """bq-refresh's initial load of 10M rows, for its peak RSS (flat against 1M: batches are streamed)."""
    big = data.write(STATE / "sqp_initial_10000000.parquet", 10_000_000, changed=False)
    prepare(db, "bq_refresh", "bench_big", "sqp")
    try:
        return isolated([sys.executable, "bq_refresh", "initial", db, str(big), "bench_big", "sqp"])
    finally:
        with psycopg.connect(db, autocommit=True) as conn:
            for s in ("bench_big", "bench_big_reg", "bench_big_staging"):
                conn.execute(f'DROP SCHEMA IF EXISTS "{s}" CASCADE')


def data_rows(rows: int) -> int:
    from bench.contenders import BASELINE_ROWS

    return min(rows, BASELINE_ROWS)


def machine() -> dict[str, Any]:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30), "python": platform.python_version(),
            "platform": platform.platform()}


def versions(bench_py: str) -> dict[str, str]:
    from importlib.metadata import version

    out = {p: version(p) for p in ("polars", "pyarrow", "adbc-driver-postgresql", "psycopg", "prefect")}
    probe = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in"
             " ('dlt', 'sling', 'pandas', 'sqlalchemy')}))")
    done = subprocess.run([bench_py, "-c", probe], capture_output=True, text=True)
    if done.returncode == 0:
        out.update(json.loads(done.stdout))
    return out


if __name__ == "__main__":
    main()
