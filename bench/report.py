"""Render bench/run.py's results as docs/benchmarks.md (with its figures) and docs/benchmarks.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELS = {
    "copy_then_index": "reference: COPY, then build key + index",
    "staged_upsert": "reference: staged upsert (COPY to UNLOGGED staging + INSERT ON CONFLICT; guarded on reload)",
    "bq_refresh": "bq-refresh (Arrow batches -> published, audited)",
    "dlt": "dlt best (parquet via ADBC, upsert, skip_unchanged_rows, 4 load jobs)",
    "sling": "Sling incremental upsert",
    "psycopg_executemany": "naive: psycopg executemany upsert (100k rows)",
    "pandas_to_sql": "naive: pandas to_sql multi-row upsert (100k rows)",
}


def _cell(entry: dict[str, Any] | None) -> tuple[str, str, str]:
    if not entry:
        return ("-", "-", "-")
    if "error" in entry:
        return ("failed", "-", "-")
    return (f"{entry['seconds']:.2f}", f"{entry['rows_per_s']:,}", f"{entry['peak_rss_mb']:,}")


def ratios(summary: dict[str, Any]) -> dict[str, float | None]:
    def secs(name: str, phase: str) -> float | None:
        e = summary.get(name, {}).get(phase)
        return float(e["seconds"]) if e and "seconds" in e else None

    ours_i, ours_r = secs("bq_refresh", "initial"), secs("bq_refresh", "reload")
    out: dict[str, float | None] = {}
    for label, num, den in (
        ("initial / copy_then_index", ours_i, secs("copy_then_index", "initial")),
        ("initial / dlt", ours_i, secs("dlt", "initial")),
        ("initial / staged_upsert", ours_i, secs("staged_upsert", "initial")),
        ("staged_upsert reload / reload", secs("staged_upsert", "reload"), ours_r),
        ("dlt reload / reload", secs("dlt", "reload"), ours_r),
    ):
        out[label] = round(num / den, 2) if num and den else None
    return out


def render(results: dict[str, Any], out: Path) -> None:
    summary = results["summary"]
    r = ratios(summary)
    results["summary"]["ratios"] = r
    lines = [
        "# Benchmarks",
        "",
        f"Measured {results['when']} by `./dev bench` (bench/run.py) on this machine: {results['machine']['cpus']} cores,"
        f" {results['machine']['memory_gb']} GB, {results['machine']['platform']}, Python {results['machine']['python']};"
        f" PostgreSQL {results['server']} with default settings (default durability: fsync, synchronous_commit on).",
        f"{results['rows']:,} SQP-shaped rows, 29 columns (NUMERIC(38,9) shares, rates and prices), primary key"
        " (start_date, asin, search_query) and an index on (asin, start_date) on every target. Every contender runs"
        " in its own process against the same server, back to back; each figure is the median of"
        f" {results['repeat']} runs (all runs listed in .state/bench/results.json); peak RSS is the contender process's"
        " (and its children's) maximum resident set.",
        "",
        "**initial**: an empty target. **reload**: the same rows again, 10% of them changed (Amazon restates a"
        " week; most restated rows did not change). Wall time includes reading the Parquet file the data sits in.",
        "",
        "| contender | initial s | rows/s | peak RSS MB | reload s | rows/s | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in LABELS.items():
        if name not in summary:
            continue
        i, rl = _cell(summary[name].get("initial")), _cell(summary[name].get("reload"))
        lines.append(f"| {label} | {i[0]} | {i[1]} | {i[2]} | {rl[0]} | {rl[1]} | {rl[2]} |")
    lines += ["", "## Ratios (one run of the benchmark)", "", "| ratio | value | target |", "|---|---:|---|"]
    targets = {"initial / copy_then_index": "<= 1.15", "initial / dlt": "< 1", "initial / staged_upsert": "",
               "staged_upsert reload / reload": ">= 3", "dlt reload / reload": ">= 3"}
    for k, v in r.items():
        lines.append(f"| {k} | {v if v is not None else '-'} | {targets.get(k, '')} |")
    info_i = summary.get("bq_refresh", {}).get("initial", {}).get("info")
    info_r = summary.get("bq_refresh", {}).get("reload", {}).get("info")
    if info_i or info_r:
        lines += ["", f"bq-refresh initial: {info_i}; reload: {info_r} (direct = loaded straight into the empty"
                  " target; skipped = rows whose hash the target already held, never sent to PostgreSQL)."]
    extra = results.get("extra", {})
    if "bq_refresh_10m_initial" in extra:
        big = extra["bq_refresh_10m_initial"]
        same = extra.get("bq_refresh_1m_initial_same_session")
        one_rss = same["rss_mb"] if same and "rss_mb" in same else summary.get("bq_refresh", {}).get("initial", {}).get("peak_rss_mb", 0)
        lines += ["", "## Memory", "",
                  f"bq-refresh initial load of 10,000,000 rows: {big.get('seconds', 0):.1f} s,"
                  f" peak RSS {big.get('rss_mb', 0):.0f} MB; 1,000,000 rows: {float(one_rss):.0f} MB. Flat: batches are"
                  " streamed, no table is held whole. Of it, ~240 MB is the interpreter with Prefect, Polars, PyArrow"
                  " and ADBC imported (`python -c 'import tasks.sync'`: 234 MB)."
                  if "seconds" in big else f"10M run failed: {big.get('error')}"]
    if "extraction" in extra and "error" in extra["extraction"]:
        lines += ["", "## Extraction through the emulator's Storage Read API", "",
                  f"Failed in this run: {extra['extraction']['error'][-400:]}"]
    elif "extraction" in extra:
        e = extra["extraction"]
        lines += ["", "## Extraction through the emulator's Storage Read API", "",
                  f"{e['rows']:,} rows loaded into the emulator (bqemulator, DuckDB inside) in {e['emulator_load_seconds']} s, then"
                  " read back through the official Storage Read client into Arrow. The emulator is not BigQuery: this shows"
                  " that the parallel path works, not what BigQuery delivers.", "",
                  "| streams asked | granted | seconds | rows/s |", "|---:|---:|---:|---:|"]
        for k in ("streams_1", "streams_4"):
            if k in e:
                s = e[k]
                lines.append(f"| {k.split('_')[1]} | {s['streams_granted']} | {s['seconds']} | {s['rows_per_s']:,} |")
    v = results.get("versions", {})
    lines += ["", "## Versions", "", ", ".join(f"{k} {val}" for k, val in sorted(v.items())), "",
              "## Rerun", "", "```bash", "./dev bench                # this page (1M rows, 3 repetitions)",
              "./dev bench --big          # plus the 10M-row memory run",
              "./dev bench --rows 200000 --repeat 1 --skip dlt,sling   # a quick look", "```", "",
              "![initial and reload times](benchmarks.png)", ""]
    notes = out.parent / "benchmarks-notes.md"
    if notes.exists():
        lines += [notes.read_text()]
    out.write_text("\n".join(lines))
    _chart(summary, out.with_suffix(".png"))


def _chart(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in LABELS if n in summary and n not in {"psycopg_executemany", "pandas_to_sql"}]
    init = [summary[n].get("initial", {}).get("seconds", 0) or 0 for n in names]
    rel = [summary[n].get("reload", {}).get("seconds", 0) or 0 for n in names]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], init, width=0.4, label="initial load")
    ax.bar([x + 0.2 for x in xs], rel, width=0.4, label="reload, 10% changed")
    ax.set_xticks(list(xs), [n.replace("_", " ") for n in names])
    ax.set_ylabel("seconds (median), lower is better")
    ax.set_title("1M SQP rows into PostgreSQL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
