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
