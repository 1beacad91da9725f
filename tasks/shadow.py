"""Shadow mode: compare a table published into the shadow schema with the live one, slice by slice and then row
by row below the slices that differ, through tasks/digest.py (the same counts and digests as bq-refresh verify)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from tasks import digest
from tasks.load import target_columns
from tasks.sqlnames import ident


def compare(conn: psycopg.Connection[Any], live: tuple[str, str], shadow: tuple[str, str], key: list[str],
            *, window: str | None = None, sample: int = 10) -> dict[str, Any]:
    """The slices (values of ``window``, else key buckets) whose rows differ, and below them the rows only in live,
    only in shadow, and with the same key but different values (the columns both hold).

    Counts are exact when ``complete``: every differing slice was bisected down to its rows (at most
    digest.MAX_SLICES_BISECTED slices, digest.MAX_ROWS_LISTED rows); otherwise they count the rows located and
    ``notes`` says what was left out.
    """
    live_cols, shadow_cols = target_columns(conn, *live), target_columns(conn, *shadow)
    if not shadow_cols:
        return {"error": f"no shadow table {shadow[0]}.{shadow[1]}: run the table in shadow mode first"}
    missing = [k for k in key if k not in live_cols or k not in shadow_cols]
    if missing:
        return {"error": f"key column(s) {', '.join(missing)} missing from {'.'.join(live)} or {'.'.join(shadow)}"}
    columns: list[digest.DigestColumn] = []
    retyped: list[str] = []  # numeric(12,2) here and numeric there share a canonical text; text and bigint do not
    for c in (c for c in live_cols if c in shadow_cols):
        mine, theirs = digest.column_of_pg(c, live_cols[c]), digest.column_of_pg(c, shadow_cols[c])
        if mine == theirs:
            columns.append(mine)
        elif c in key:
            return {"error": f"key column {c} is {live_cols[c]} in {'.'.join(live)} but {shadow_cols[c]} in"
                             f" {'.'.join(shadow)}: the copies cannot be matched by key"}
        else:
            retyped.append(c)
    one_sided = sorted(set(live_cols) ^ set(shadow_cols))
    by_name = {c.target_name: c for c in columns}
    slice_by = by_name.get(window or "")
    slicing = digest.Slicing(slice_by if slice_by is not None and slice_by.exact else None, [by_name[k] for k in key])

    def run(query: sql.Composed) -> list[Any]:
        return [tuple(r) for r in conn.execute(query).fetchall()]

    a, b = digest.PostgresSide(ident(*live), run), digest.PostgresSide(ident(*shadow), run)
    notes: list[str] = []
    # One snapshot of both tables for every query (a publish meanwhile changes neither), and floats printed in
    # their shortest exact text whatever a role sets (extra_float_digits below 1 rounds them).
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute("SET LOCAL extra_float_digits = 3")
        compared = digest.compare_slices(a, b, columns, slicing)
        found = digest.locate_rows(a, b, columns, slicing, compared.differing, notes) if compared.differing else []
    only_live = sum(1 for r in found if r.kind == "missing")
    only_shadow = sum(1 for r in found if r.kind == "extra")
    different = sum(1 for r in found if r.kind == "differs")
    live_rows = sum(d.rows for d in compared.source.values())
    complete = not notes  # locate_rows says what it left out
    if retyped:
        notes.append(f"column(s) {', '.join(retyped)} of another kind of type in the shadow table: not comparable,"
                     " so the copies are not called identical")
    if one_sided:
        notes.append(f"column(s) {', '.join(one_sided)} in one of the two tables only: not compared")
    return {
        "live": ".".join(live), "shadow": ".".join(shadow), "slicing": slicing.label,
        "only_in_live": only_live, "only_in_shadow": only_shadow, "different": different,
        "same": live_rows - only_live - different, "compared_columns": [c for c in by_name if c not in key],
        "differing_slices": [{"slice": d.slice, "live_rows": d.source_rows, "shadow_rows": d.target_rows}
                             for d in compared.differing],
        "examples": [{"key": list(r.key.values()), "difference": _LABELS[r.kind], "columns": r.columns}
                     for r in found[:sample]],
        "complete": complete,
        "notes": notes,
        "identical": not compared.differing and not retyped,
    }


_LABELS = {"missing": "only in live", "extra": "only in shadow", "differs": "different"}
