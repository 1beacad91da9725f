"""Verify's digest code against reladiff 0.6, PostgreSQL to PostgreSQL, on the same PostgreSQL 15 tables: wall
time to the answer (the 3 hand edits found by key) and bytes the server sent to the client. Writes
docs/verify-benchmark.md.

    .venv/bin/python -m bench.verify_diff                  # 1M rows, 3 repetitions (median)
    .venv/bin/python -m bench.verify_diff --rows 100000    # a quick look
    .venv/bin/python -m bench.verify_diff --big            # also 10M rows

reladiff lives in the benchmark's own virtualenv (.venv-bench, installed by ``./dev bench``); the page keeps
whatever is written below its marker line (``KEPT``) when it is generated again.

Table ``a`` holds the SQP benchmark data (bench/data.py, loaded by COPY, primary key start_date, asin,
search_query); ``b`` is its copy with 3 hand edits in different weeks (an UPDATE of a metric, a DELETE, an INSERT
of a new key). Each contender runs in its own process and connects through one byte-counting TCP proxy
(``CountingProxy``), so both byte counts are the PostgreSQL wire protocol's server-to-client bytes, measured alike.

- bq-refresh: verify's comparison (tasks/digest.py compare_slices, then locate_rows) with a PostgreSQL source
  side used only here: ``a`` and ``b`` are each a digest.PostgresSide (the BigQuery side's queries become their
  PostgreSQL twins), queried at once as verify queries its two sides.
- reladiff 0.6 (the maintained fork of data-diff, installed in .venv-bench only), through its Python API with
  its command line's defaults (1 thread a database, a thread pool of 2): hashdiff with one connection a side, as
  between two databases (the comparable case: checksums of key segments on both sides, bisected down to rows it
  downloads), and, for reference, joindiff, what it picks when both tables share a database (one outer join in
  the database; not possible between BigQuery and PostgreSQL).

reladiff 0.6 takes only integer, UUID or alphanumeric-string key columns (sqeleton's ``IKey``): the SQP key is
refused ("Cannot use a column of type Date(...) as a key"; search_query holds spaces). So both tables also carry
a surrogate key ``id`` (bigint, numbered in load order, unique), the usual key of data-diff's users: reladiff keys
on it and compares the 29 columns; bq-refresh ignores it and keys on the natural key.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".state" / "bench-verify"
DOC = ROOT / "docs" / "verify-benchmark.md"
SCHEMA = "bench_verify"
BIG_ROWS = 10_000_000
SURROGATE = "id"  # reladiff's key (it refuses the natural key: see the module's docstring)
METRIC = "search_query_volume"  # the column the hand UPDATE changes
NEW_QUERY = "search query inserted by hand"
BQ_TYPES = {"date": "DATE", "text": "STRING", "bigint": "INT64", "numeric(38,9)": "NUMERIC",
            "timestamp with time zone": "TIMESTAMP"}  # tasks/typemap.py's contract, read backwards
CONTENDERS = {  # name -> (which virtualenv, label in the report)
    "bq_refresh": ("main", "bq-refresh verify (digest + locate_rows)"),
    "reladiff_hashdiff": ("bench", "reladiff 0.6 hashdiff (a connection a side)"),
    "reladiff_joindiff": ("bench", "reladiff 0.6 joindiff (one database; reference)"),
}
KEPT = "<!-- Below this line is kept when bench/verify_diff.py rewrites the page. -->"


class CountingProxy:
    """A TCP proxy on a free local port in front of PostgreSQL that counts the bytes passing each way."""

    def __init__(self, upstream_uri: str) -> None:
        parts = urlsplit(upstream_uri)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self.listener = socket.create_server(("127.0.0.1", 0))
        port = self.listener.getsockname()[1]
        user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        self.uri = urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))
        self._lock = threading.Lock()
        self.to_client = self.to_server = self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.to_client = self.to_server = self.connections = 0

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, to_client: bool) -> None:
        try:
            while chunk := src.recv(262144):
                dst.sendall(chunk)
                with self._lock:
                    if to_client:
                        self.to_client += len(chunk)
                    else:
                        self.to_server += len(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


# --- bq-refresh's side (runs in .venv) ------------------------------------------------------------------------

def bq_refresh_side(db: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Slices' digests on both sides, the differing slices, then digest.locate_rows down to the rows (timed from the
    first connection to the answer): verify's own comparison, with two ``PostgresSide`` s instead of BigQuery's and
    PostgreSQL's (one connection a side, queries of both sides at once, as verify runs them)."""
    import psycopg

    from tasks import digest
    from tasks.sqlnames import ident

    columns = [digest.DigestColumn(name, name, BQ_TYPES[pg_type]) for name, pg_type in spec["columns"]]
    by_name = {c.target_name: c for c in columns}
    slicing = digest.Slicing(by_name[spec["window"]], [by_name[k] for k in spec["key"]])
    started = time.monotonic()
    queries = 0
    with psycopg.connect(db, autocommit=True) as source, psycopg.connect(db, autocommit=True) as target:
        def on_source(query: Any) -> list[Any]:
            nonlocal queries
            queries += 1
            return [tuple(r) for r in source.execute(query).fetchall()]

        a = digest.PostgresSide(ident(SCHEMA, "a"), on_source)
        b = digest.PostgresSide(ident(SCHEMA, "b"), lambda q: [tuple(r) for r in target.execute(q).fetchall()])
        compared = digest.compare_slices(a, b, columns, slicing)
        slices_at = time.monotonic() - started
        found = digest.locate_rows(a, b, columns, slicing, compared.differing, [])
    return {"seconds": time.monotonic() - started, "slices_seconds": slices_at, "slices": len(compared.source),
            "differing_slices": [d.slice for d in compared.differing], "source_queries": queries,
            "found": [{"key": [r.key[k] for k in spec["key"]], "kind": r.kind, "columns": r.columns} for r in found]}


# --- reladiff's side (runs in .venv-bench) --------------------------------------------------------------------

def reladiff_side(db: str, spec: dict[str, Any], algorithm: str) -> dict[str, Any]:
    """reladiff's diff of a and b by the surrogate key ``id`` (all 29 columns compared), with its command line's
    defaults, timed from the first connection to the answer (every difference read)."""
    from reladiff import Algorithm, connect, connect_to_table, diff_tables

    compared = tuple(name for name, _ in spec["columns"])
    started = time.monotonic()
    if algorithm == "hashdiff":  # as between two databases: its own connection (and thread) a side
        dbs = connect(db, 1, shared=False), connect(db, 1, shared=False)
    else:
        one = connect(db, 1)
        dbs = one, one
    a = connect_to_table(dbs[0], f"{SCHEMA}.a", (SURROGATE,), extra_columns=compared)
    b = connect_to_table(dbs[1], f"{SCHEMA}.b", (SURROGATE,), extra_columns=compared)
    with diff_tables(a, b, algorithm=Algorithm(algorithm), max_threadpool_size=2) as diff:
        ops = [(op, [None if v is None else str(v) for v in values]) for op, values in diff]
    seconds = time.monotonic() - started
    # Its answer by the natural key (each line: the surrogate key, then the compared columns' values).
    natural = [compared.index(k) for k in spec["key"]]
    by_key: dict[tuple[str, ...], dict[str, list[str | None]]] = {}
    for op, values in ops:
        row = values[1:]
        k = tuple(str(row[i])[:10] if n == 0 else str(row[i]) for n, i in enumerate(natural))
        by_key.setdefault(k, {})[op] = row
    found = []
    for k, sides in sorted(by_key.items()):
        if "-" in sides and "+" in sides:
            changed = [c for c, x, y in zip(compared, sides["-"], sides["+"], strict=True) if x != y]
            found.append({"key": list(k), "kind": "differs", "columns": changed})
        else:  # "-": in a (the source) only; "+": in b only
            found.append({"key": list(k), "kind": "missing" if "-" in sides else "extra", "columns": []})
    return {"seconds": seconds, "found": found, "lines": len(ops)}


def one(argv: list[str]) -> None:
    """A child process: ``--one NAME DB SPEC_JSON``; prints its result as JSON on the last line."""
    name, db, spec = argv[0], argv[1], json.loads(argv[2])
    result = bq_refresh_side(db, spec) if name == "bq_refresh" else reladiff_side(db, spec, name.split("_", 1)[1])
    print(json.dumps(result))  # noqa: T201


# --- the benchmark (runs in .venv) ----------------------------------------------------------------------------

def load(db: str, rows: int) -> dict[str, Any]:
    """Table a (COPY of the SQP data, then its primary key), b its copy, 3 hand edits in b; the edits expected."""
    import psycopg
    from psycopg import sql

    from bench import data
    from bench.contenders import _adbc_copy

    started = time.monotonic()
    path = data.write(STATE / f"sqp_initial_{rows}.parquet", rows, changed=False)
    a, b = sql.Identifier(SCHEMA, "a"), sql.Identifier(SCHEMA, "b")
    key = sql.SQL(", ").join(sql.Identifier(k) for k in data.KEY)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
        for statement in data.create_table_sql(SCHEMA, "a", indexes=False):
            conn.execute(statement)
        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} bigint GENERATED BY DEFAULT AS IDENTITY").format(
            a, sql.Identifier(SURROGATE)))
    loaded = _adbc_copy(db, SCHEMA, "a", path)
    assert loaded == rows, (loaded, rows)
    # Rows a sixth, a half and five sixths in: different weeks from 300k rows on (50,000 rows a week).
    picks = [data.batch(i, i + 1, changed=False).to_pylist()[0] for i in (rows // 6, rows // 2, rows * 5 // 6)]
    keys = [tuple(p[k] for k in data.KEY) for p in picks]
    where = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in data.KEY)
    names = [n for n, _ in data.COLUMNS] + [SURROGATE]
    copied = sql.SQL(", ").join(sql.Placeholder() if n == "search_query" else sql.Identifier(n) for n in names[:-1])
    with psycopg.connect(db, autocommit=True) as conn:
        surrogate = sql.Identifier(SURROGATE)
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({}), ADD UNIQUE ({})").format(a, key, surrogate))
        conn.execute(sql.SQL("CREATE TABLE {} AS SELECT * FROM {}").format(b, a))
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({}), ADD UNIQUE ({})").format(b, key, surrogate))
        edited = conn.execute(sql.SQL("UPDATE {} SET {m} = {m} + 1 WHERE {}").format(
            b, where, m=sql.Identifier(METRIC)), keys[0]).rowcount
        edited += conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(b, where), keys[1]).rowcount
        edited += conn.execute(sql.SQL("INSERT INTO {} ({}) SELECT {}, (SELECT max({}) + 1 FROM {}) FROM {} WHERE {}").format(
            b, sql.SQL(", ").join(map(sql.Identifier, names)), copied, surrogate, a, a, where),
            (NEW_QUERY, *keys[2])).rowcount
        assert edited == 3, edited
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(a))
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(b))
        size = conn.execute("SELECT pg_total_relation_size(%s)", (f"{SCHEMA}.a",)).fetchone()[0]  # type: ignore[index]
    inserted = (keys[2][0], keys[2][1], NEW_QUERY)
    expected = sorted([
        {"key": [keys[0][0].isoformat(), *keys[0][1:]], "kind": "differs", "columns": [METRIC]},
        {"key": [keys[1][0].isoformat(), *keys[1][1:]], "kind": "missing", "columns": []},
        {"key": [inserted[0].isoformat(), *inserted[1:]], "kind": "extra", "columns": []},
    ], key=lambda r: r["key"])
    return {"rows": rows, "table_bytes": int(size), "expected": expected, "load_seconds": time.monotonic() - started}


def run_child(python: str, name: str, db: str, spec: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    done = subprocess.run([python, "-m", "bench.verify_diff", "--one", name, db, json.dumps(spec)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout)[-1500:]}
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_seconds": time.monotonic() - started}


def measure(db: str, rows: int, repeat: int, pythons: dict[str, str]) -> dict[str, Any]:
    from bench import data

    table = load(db, rows)
    print(f"{rows} rows loaded in {table['load_seconds']:.0f} s; a is {table['table_bytes'] / 2**20:.0f} MiB",  # noqa: T201
          file=sys.stderr)
    spec = {"columns": data.COLUMNS, "key": data.KEY, "window": "start_date"}
    proxy = CountingProxy(db)
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for rep in range(repeat):
            for name, (venv, _) in CONTENDERS.items():
                proxy.reset()
                result = run_child(pythons[venv], name, proxy.uri, spec)
                time.sleep(0.2)  # the last closing bytes
                result.update(bytes_to_client=proxy.to_client, bytes_to_server=proxy.to_server,
                              connections=proxy.connections, load_average=os.getloadavg()[0])
                if "found" in result:
                    result["correct"] = sorted(result["found"], key=lambda r: r["key"]) == table["expected"]
                runs.setdefault(name, []).append(result)
                print(f"{rows} rows, rep {rep + 1}, {name}: {json.dumps(result)[:600]}", file=sys.stderr)  # noqa: T201
    finally:
        proxy.close()
    return {**table, "runs": runs, "summary": {name: summarize(items, table["table_bytes"]) for name, items in runs.items()}}


def summarize(items: list[dict[str, Any]], table_bytes: int) -> dict[str, Any]:
    ok = [r for r in items if "seconds" in r]
    if not ok:
        return {"error": items[-1].get("error", "")[-600:]}
    sent = statistics.median(r["bytes_to_client"] for r in ok)
    return {"seconds": statistics.median(r["seconds"] for r in ok), "runs": [round(r["seconds"], 2) for r in ok],
            "process_seconds": statistics.median(r["process_seconds"] for r in ok), "bytes_to_client": int(sent),
            "share": sent / table_bytes, "correct": all(r.get("correct") for r in ok) and len(ok) == len(items),
            "found": ok[-1]["found"],
            **({"slices_seconds": statistics.median(r["slices_seconds"] for r in ok),
                "source_queries": ok[-1]["source_queries"]} if "slices_seconds" in ok[0] else {})}


def table_markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| rows | tool | time to answer, median (s) | runs (s) | process incl. start-up (s) |"
             " bytes server→client | share of a's size | found exactly the 3 edits |",
             "| ---: | --- | ---: | --- | ---: | ---: | ---: | --- |"]
    for res in results:
        for name, (_, label) in CONTENDERS.items():
            s = res["summary"].get(name, {})
            if "error" in s or not s:
                lines.append(f"| {res['rows']:,} | {label} | failed: {s.get('error', 'not run')[-200:]!r} | | | | | |")
                continue
            lines.append(f"| {res['rows']:,} | {label} | {s['seconds']:.2f} | {', '.join(f'{x:.2f}' for x in s['runs'])}"
                         f" | {s['process_seconds']:.2f} | {s['bytes_to_client']:,} | {s['share']:.4%}"
                         f" | {'yes' if s['correct'] else 'no'} |")
    return "\n".join(lines)


def comparison(res: dict[str, Any]) -> str:
    ours, theirs = res["summary"].get("bq_refresh", {}), res["summary"].get("reladiff_hashdiff", {})
    if "seconds" not in ours or "seconds" not in theirs:
        return f"- {res['rows']:,} rows: no comparison (a contender failed)."
    t, b = theirs["seconds"] / ours["seconds"], theirs["bytes_to_client"] / max(ours["bytes_to_client"], 1)
    faster = (f"bq-refresh answered {t:.1f}x faster than reladiff's hashdiff" if t >= 1
              else f"reladiff's hashdiff answered {1 / t:.1f}x faster than bq-refresh")
    fewer = (f"bq-refresh read {b:.0f}x fewer bytes" if b >= 1 else f"bq-refresh read {1 / b:.1f}x more bytes")
    return (f"- {res['rows']:,} rows: {faster} ({ours['seconds']:.2f} s against {theirs['seconds']:.2f} s);"
            f" {fewer} ({ours['bytes_to_client']:,} against {theirs['bytes_to_client']:,}). bq-refresh spent"
            f" {ours['slices_seconds']:.1f} s of its {ours['seconds']:.1f} s on the two slice digests (one full scan of"
            f" each table, side by side), the rest bisecting ({ours['source_queries']} queries a side in all).")


def render(results: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    kept = ""
    if out.exists() and KEPT in out.read_text():
        kept = out.read_text().split(KEPT, 1)[1]
    seen = [r["load_average"] for res in results for items in res["runs"].values() for r in items if "load_average" in r]
    loads = f"{min(seen):.1f} to {max(seen):.1f}" if seen else "not recorded"
    sizes = "; ".join(f"{r['rows']:,} rows: table a {r['table_bytes'] / 2**20:,.0f} MiB"
                      f" (pg_total_relation_size: heap, primary key, unique index on {SURROGATE})" for r in results)
    text = f"""# Verify against reladiff: PostgreSQL to PostgreSQL

Generated by `{meta['command']}` on {meta['when']} (bench/verify_diff.py; its docstring says how each side runs).

**Machine:** {meta['cpus']} cores, {meta['memory_gb']} GiB RAM, {meta['platform']}; PostgreSQL {meta['server']}
(started by the benchmark, default settings); Python {meta['python']}; reladiff {meta['reladiff']}, psycopg
{meta['psycopg']}. **Timings are noisy:** other engineers ran test suites on the same {meta['cpus']} cores meanwhile (the
1-minute load average at the end of each run was {loads}; every run's is in `.state/bench-verify/results.json`);
each figure is the median of {meta['repeat']} runs, every run is listed.

**Data:** {sizes}. Table `a` is the SQP benchmark data (bench/data.py: 29 columns, key start_date, asin,
search_query, 50,000 rows a week; 10M rows are made the same way), loaded by COPY; `b` is its copy with 3 hand
edits in different weeks: an UPDATE of `{METRIC}`, a DELETE, an INSERT of a new key. Both tools compare all 29
columns. bq-refresh keys on the natural key; reladiff 0.6 refuses it (it takes only integer, UUID or alphanumeric
keys: "Cannot use a column of type Date(...) as a key", and search_query holds spaces), so both tables also carry a
surrogate `{SURROGATE}` (bigint in load order, unique index) that reladiff keys on, as data-diff's users do.

**Measured:** time from the contender's first connection to its answer (every differing row read), inside its own
process (the "process" column adds interpreter start-up and imports); bytes are the PostgreSQL wire protocol's
server-to-client bytes of all the contender's connections, counted by one TCP proxy in front of the server that
both go through (result rows and protocol overhead alike). "Found exactly the 3 edits": the differing keys, and
for the UPDATE the column, equal the 3 edits, nothing more, in every run.

{table_markdown(results)}

{chr(10).join(comparison(r) for r in results)}

How each works here: bq-refresh computes one digest per week slice on each side (two full scans), then bisects
the 3 differing weeks by the key hash (256 segments a step) and reads a digest per column value of the last
segments' rows; reladiff's hashdiff checksums 32 key ranges a step on each side (ranges of `{SURROGATE}`, by its index) and
downloads whole rows once a range is under 16,384 rows; its joindiff runs one outer join of both tables inside
the database, which needs both tables in one database (never the case between BigQuery and PostgreSQL).

{KEPT}{kept}"""
    out.write_text(text)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        one(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--big", action="store_true", help=f"also {BIG_ROWS:,} rows")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bench-python", default=str(ROOT / ".venv-bench" / "bin" / "python"))
    parser.add_argument("--out", default=str(DOC))
    args = parser.parse_args()
    probe = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in ('reladiff',)}))")
    found = subprocess.run([args.bench_python, "-c", probe], capture_output=True, text=True) if Path(
        args.bench_python).exists() else None
    if found is None or found.returncode != 0:
        sys.exit(f"reladiff is not installed in {args.bench_python}: .venv/bin/uv venv .venv-bench (if missing), then"
                 " .venv/bin/uv pip install --python .venv-bench/bin/python 'reladiff[postgresql]==0.6.*'")
    from bench.run import start_pg15, stop_pg15

    STATE.mkdir(parents=True, exist_ok=True)
    db = start_pg15(STATE)
    if db is None:
        sys.exit("PostgreSQL 15 is not installed (/usr/lib/postgresql/15/bin): apt-get install postgresql-15")
    sizes = [args.rows] + ([BIG_ROWS] if args.big and args.rows != BIG_ROWS else [])
    results: list[dict[str, Any]] = []
    try:
        import psutil
        import psycopg

        with psycopg.connect(db) as conn:
            server = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        pythons = {"main": sys.executable, "bench": args.bench_python}
        for rows in sizes:
            results.append(measure(db, rows, args.repeat, pythons))
            (STATE / "results.json").write_text(json.dumps(results, indent=1, default=str))
    finally:
        stop_pg15(STATE)
    from importlib.metadata import version

    meta = {"command": ".venv/bin/python -m bench.verify_diff " + " ".join(sys.argv[1:]),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30), "platform": platform.platform(),
            "python": platform.python_version(), "server": server, "repeat": args.repeat,
            "reladiff": json.loads(found.stdout)["reladiff"], "psycopg": version("psycopg")}
    (STATE / "results.json").write_text(json.dumps({"meta": meta, "sizes": results}, indent=1, default=str))
    render(results, meta, Path(args.out))
    print(table_markdown(results))  # noqa: T201
    for r in results:
        print(comparison(r))  # noqa: T201


if __name__ == "__main__":
    main()
