"""bq-refresh against an earlier revision of itself: the same benchmark (bench/run.py, bq-refresh's initial load and
10%-changed reload of SQP rows fed from Parquet), the two checkouts run alternately, repetition by repetition, so
that the machine's drift falls on both alike. Prints each figure's runs, median and spread, and whether the new
median is within max(5%, the larger spread) of the old one.

    ./dev bench --compare HEAD~3               # 1M rows, 3 repetitions each
    ./dev bench --compare v0.1 --rows 200000 --repeat 5
"""

from __future__ import annotations

import argparse
import ast
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ONLY_BQ_REFRESH = "sling,dlt,copy_then_index,staged_upsert,psycopg_executemany,pandas_to_sql"
FIGURES = [("initial", "seconds"), ("reload", "seconds"), ("initial", "rss_mb"), ("reload", "rss_mb")]


def checkout(rev: str) -> Path:
    """A worktree of ``rev`` under .state/compare (made once per commit), sharing this checkout's benchmark data."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    tree = ROOT / ".state" / "compare" / sha[:12]
    if not (tree / "bench" / "run.py").exists():
        subprocess.run(["git", "worktree", "add", "--force", "--detach", str(tree), sha], cwd=ROOT, check=True,
                       capture_output=True)
    data, theirs = ROOT / ".state" / "bench", tree / ".state" / "bench"
    theirs.mkdir(parents=True, exist_ok=True)
    for parquet in data.glob("sqp_*.parquet"):  # the data files are the same for both: generated once
        link = theirs / parquet.name
        if not link.exists():
            link.symlink_to(parquet)
    return tree


def one_run(tree: Path, rows: int) -> dict[str, dict[str, Any]]:
    """bench/run.py of ``tree`` for bq-refresh alone, once: {phase: {"seconds": ..., "rss_mb": ...}}."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-compare-{os.getpid()}.md"
    done = subprocess.run([sys.executable, "-m", "bench.run", "--rows", str(rows), "--repeat", "1", "--skip",
                           ONLY_BQ_REFRESH, "--no-extraction", "--out", str(out)], cwd=tree, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(tree)}, timeout=3600)
    found: dict[str, dict[str, Any]] = {}
    for line in done.stderr.splitlines():  # "rep 1 bq_refresh initial: {...}"
        head, _, body = line.partition(": ")
        if head.startswith("rep ") and " bq_refresh " in head:
            found[head.rsplit(" ", 1)[1]] = ast.literal_eval(body)
    if set(found) != {"initial", "reload"} or any("seconds" not in r for r in found.values()):
        raise SystemExit(f"bench/run.py in {tree} gave no figures: {done.stderr[-1500:]}")
    return found


def verdict(old: list[float], new: list[float]) -> tuple[float, float, str]:
    """(new median / old median, the allowed margin, "ok" or "SLOWER"/"LARGER")."""
    mo, mn = statistics.median(old), statistics.median(new)
    spread = max(max(old) - min(old), max(new) - min(new))
    allowed = max(0.05 * mo, spread)
    return mn / mo, allowed, "ok" if mn - mo <= allowed else "WORSE"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev", help="the earlier revision (any git revision)")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    old_tree = checkout(args.rev)
    runs: dict[str, list[dict[str, dict[str, Any]]]] = {"old": [], "new": []}
    for rep in range(args.repeat):
        for side, tree in (("old", old_tree), ("new", ROOT)):
            runs[side].append(one_run(tree, args.rows))
            r = runs[side][-1]
            print(f"rep {rep + 1} {side}: initial {r['initial']['seconds']:.2f} s {r['initial']['rss_mb']:.0f} MB,"  # noqa: T201
                  f" reload {r['reload']['seconds']:.2f} s {r['reload']['rss_mb']:.0f} MB", flush=True)
    print(f"\n{args.rows:,} rows, {args.repeat} repetitions each, old = {args.rev}, alternating\n")  # noqa: T201
    print("| figure | old runs | new runs | old median | new median | new/old | allowed | |")  # noqa: T201
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")  # noqa: T201
    worse = 0
    for phase, key in FIGURES:
        old = [float(r[phase][key]) for r in runs["old"]]
        new = [float(r[phase][key]) for r in runs["new"]]
        ratio, allowed, word = verdict(old, new)
        worse += word != "ok"
        unit = "s" if key == "seconds" else "MB"
        print(f"| {phase} {'wall' if key == 'seconds' else 'peak RSS'} | {', '.join(f'{v:.2f}' for v in old)} |"  # noqa: T201
              f" {', '.join(f'{v:.2f}' for v in new)} | {statistics.median(old):.2f} {unit} |"
              f" {statistics.median(new):.2f} {unit} | {ratio:.3f} | {allowed:.2f} {unit} | {word} |")
    sys.exit(1 if worse else 0)


if __name__ == "__main__":
    main()
