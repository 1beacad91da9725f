"""Planning a run: waves of tables from the dependency graph, priority first within a wave."""

from __future__ import annotations

from bq_refresh.errors import DependencyCycle


def plan_waves(
    tables: dict[str, int], dependencies: list[tuple[str, str, str]]
) -> list[list[str]]:
    """Order ``tables`` (name -> priority) into waves: every table after the tables it depends on.

    Dependencies on tables outside this run order nothing (they are not refreshed now). A cycle is
    an error naming its members.

    Args:
        tables: the tables of this run and their priorities (higher first).
        dependencies: (parent, dependent, kind) triples, kind hard or soft.

    Returns:
        Waves of table names; tables of one wave may run at the same time.
    """
    parents: dict[str, set[str]] = {t: set() for t in tables}
    for parent, dependent, _kind in dependencies:
        if parent in tables and dependent in tables:
            parents[dependent].add(parent)
    waves: list[list[str]] = []
    placed: set[str] = set()
    remaining = set(tables)
    while remaining:
        ready = [t for t in remaining if parents[t] <= placed]
        if not ready:
            raise DependencyCycle(f"dependency cycle among: {' -> '.join(_find_cycle(parents, remaining))}")
        ready.sort(key=lambda t: (-tables[t], t))
        waves.append(ready)
        placed.update(ready)
        remaining.difference_update(ready)
    return waves


def _find_cycle(parents: dict[str, set[str]], remaining: set[str]) -> list[str]:
    start = sorted(remaining)[0]
    path: list[str] = [start]
    seen = {start: 0}
    node = start
    while True:
        node = sorted(p for p in parents[node] if p in remaining)[0]
        if node in seen:
            cycle = path[seen[node]:] + [node]
            return list(reversed(cycle))
        seen[node] = len(path)
        path.append(node)


def split_cycles(
    tables: dict[str, int], dependencies: list[tuple[str, str, str]]
) -> tuple[dict[str, int], dict[str, str]]:
    """Set apart the tables that sit on a dependency cycle (or depend on one) so the rest can run.

    Returns:
        (tables free of cycles with their priorities, {table on or behind a cycle: message naming the cycle}).
    """
    parents: dict[str, set[str]] = {t: set() for t in tables}
    for parent, dependent, _kind in dependencies:
        if parent in tables and dependent in tables:
            parents[dependent].add(parent)
    placed: set[str] = set()
    remaining = set(tables)
    while True:
        ready = {t for t in remaining if parents[t] <= placed}
        if not ready:
            break
        placed |= ready
        remaining -= ready
    stuck: dict[str, str] = {}
    for t in sorted(remaining):
        cycle = _cycle_from(parents, remaining, t)
        arrow = " -> ".join(cycle)
        stuck[t] = f"dependency cycle: {arrow}" if t in cycle else f"depends on the dependency cycle {arrow}"
    return {t: p for t, p in tables.items() if t in placed}, stuck


def _cycle_from(parents: dict[str, set[str]], remaining: set[str], start: str) -> list[str]:
    """Walk from ``start`` up its parents (every table left has one left) to the cycle it leads to."""
    path, seen, node = [start], {start: 0}, start
    while True:
        node = sorted(p for p in parents[node] if p in remaining)[0]
        if node in seen:
            return list(reversed(path[seen[node]:] + [node]))
        seen[node] = len(path)
        path.append(node)


# PostgreSQL sessions one table's run holds at its peak: its lock, its main psycopg session, a short one for audit
# and checkpoint writes, and one ADBC session per Storage Read stream while it stages.
SESSIONS_PER_TABLE = 3
PARENT_SESSIONS = 1  # the parent flow's own short sessions (registry, audit of skipped tables, alerts)


def table_sessions(streams: int) -> int:
    """The sessions one table's run may hold at once with ``streams`` read streams."""
    return SESSIONS_PER_TABLE + max(1, streams)


def streams_within(streams: int, budget: int | None) -> int:
    """A table's read streams, fewer when its sessions alone would not fit in ``budget`` (REFRESH_MAX_CONNECTIONS)."""
    if budget is None:
        return streams
    return max(1, min(streams, budget - PARENT_SESSIONS - SESSIONS_PER_TABLE))


def admits(running: list[int], need: int, budget: int | None) -> bool:
    """Whether a table needing ``need`` sessions may start beside tables holding ``running``: always when nothing
    runs (a table fits alone once its streams are capped by ``streams_within``)."""
    if budget is None or not running:
        return True
    return PARENT_SESSIONS + sum(running) + need <= budget
