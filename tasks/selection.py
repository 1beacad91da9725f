"""Choosing tables as dbt chooses models: globs on schema.table, tag:NAME, and the graph operators +, N+ and @."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from bq_refresh.errors import ConfigError

TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
TAG_RULE = "letters, digits, _ . - (no spaces, commas or colons), starting with a letter, digit or _"
METHODS = ("tag",)  # besides the default: a glob on schema.table
# dbt's selector grammar (dbt/graph/selector_spec.py): [@][N+][method:]value[+N]
_SELECTOR = re.compile(
    r"^(?P<at>@)?(?P<parents>(?P<parents_depth>\d*)\+)?(?:(?P<method>[A-Za-z_]\w*):)?(?P<value>.*?)"
    r"(?P<children>\+(?P<children_depth>\d*))?$"
)


class SelectionError(ConfigError):
    """A --select or --exclude that is malformed or chooses nothing; the message names it."""


@dataclass(frozen=True)
class Candidate:
    """A registered table as selection sees it."""

    name: str  # schema.table
    tags: frozenset[str] = frozenset()
    enabled: bool = True


@dataclass(frozen=True)
class Atom:
    """One selector method and value with its graph operators (dbt's SelectionCriteria)."""

    text: str
    method: str  # "name" (a glob on schema.table) or "tag"
    value: str  # a glob (fnmatch: * ? [...]), case-sensitive like PostgreSQL's quoted names
    parents: bool = False  # +value: and everything it depends on
    parents_depth: int | None = None  # N+value: N generations up; None: all
    children: bool = False  # value+: and everything that depends on it
    children_depth: int | None = None
    childrens_parents: bool = False  # @value: value, its descendants and all their ancestors


@dataclass(frozen=True)
class Selection:
    """What a selection chose: ``tables`` in the candidates' order, and the disabled tables it matched but left
    out (a run never refreshes a disabled table through a selector; --table names one to run it anyway)."""

    tables: list[str]
    left_out_disabled: list[str]


def valid_tags(tags: Iterable[str], table: str) -> list[str]:
    """The tags sorted and without duplicates.

    Raises:
        ConfigError: naming the table, the key ``tags`` and the tag that breaks the rule.
    """
    out = set()
    for tag in tags:
        if not isinstance(tag, str) or not TAG.match(tag):
            raise ConfigError(f"tags: {tag!r} is not a tag name ({TAG_RULE})", table=table)
        out.add(tag)
    return sorted(out)


def parse_atom(text: str, default_schema: str, option: str = "--select") -> Atom:
    """Parse one selector such as ``sqp.*``, ``tag:nightly``, ``+asin_performance_data``, ``2+t+`` or ``@t``.

    A name without a dot is a table of ``default_schema`` (as ``--table`` takes it).

    Raises:
        SelectionError: naming the option and the selector.
    """
    match = _SELECTOR.match(text)
    if match is None or not match["value"]:
        raise SelectionError(f"{option} {text!r}: give a schema.table glob or tag:NAME, with + before (what it"
                             " depends on) or after (what depends on it)")
    method = match["method"] or "name"
    if method not in ("name", *METHODS):
        raise SelectionError(f"{option} {text!r}: unknown selector method {method!r} (a schema.table glob, or"
                             f" {', '.join(m + ':NAME' for m in METHODS)})")
    if match["at"] and (match["parents"] or match["children"]):
        raise SelectionError(f"{option} {text!r}: @ cannot be combined with + (dbt's rule)")
    value = match["value"]
    if method == "name" and "." not in value:
        value = f"{default_schema}.{value}"

    def depth(digits: str | None) -> int | None:
        return int(digits) if digits else None

    return Atom(text=text, method=method, value=value,
                parents=bool(match["parents"]), parents_depth=depth(match["parents_depth"]),
                children=bool(match["children"]), children_depth=depth(match["children_depth"]),
                childrens_parents=bool(match["at"]))


def parse(arg: str, default_schema: str, option: str = "--select") -> list[list[Atom]]:
    """One --select/--exclude value: space-separated parts are a union, comma-separated atoms within a part an
    intersection (``'tag:nightly,sqp.*'``), as in dbt.

    Raises:
        SelectionError: an empty value, or a malformed atom.
    """
    parts = [[parse_atom(atom, default_schema, option) for atom in part.split(",")] for part in arg.split()]
    if not parts:
        raise SelectionError(f"{option} {arg!r}: empty selector")
    return parts


def _walk(start: set[str], edges: dict[str, set[str]], depth: int | None) -> set[str]:
    """The nodes reached from ``start`` along ``edges`` in at most ``depth`` steps (None: any number)."""
    seen: set[str] = set()
    frontier = set(start)
    step = 0
    while frontier and (depth is None or step < depth):
        frontier = {n for f in frontier for n in edges.get(f, ())} - seen
        seen |= frontier
        step += 1
    return seen


@dataclass(frozen=True)
class Graph:
    """The dependency graph of the registered tables (hard and soft dependencies alike)."""

    parents: dict[str, set[str]]
    children: dict[str, set[str]]

    @classmethod
    def of(cls, dependencies: Iterable[tuple[str, str]]) -> Graph:
        """From (parent, dependent) pairs."""
        parents: dict[str, set[str]] = {}
        children: dict[str, set[str]] = {}
        for parent, dependent in dependencies:
            parents.setdefault(dependent, set()).add(parent)
            children.setdefault(parent, set()).add(dependent)
        return cls(parents, children)


def matches(atom: Atom, candidates: Sequence[Candidate]) -> set[str]:
    """The tables an atom's method and value match, before its graph operators."""
    if atom.method == "tag":
        return {c.name for c in candidates if any(fnmatchcase(t, atom.value) for t in c.tags)}
    return {c.name for c in candidates if fnmatchcase(c.name, atom.value)}


def expand(atom: Atom, base: set[str], graph: Graph) -> set[str]:
    """``base`` with what the atom's graph operators add."""
    chosen = set(base)
    if atom.childrens_parents:
        below = base | _walk(base, graph.children, None)
        return below | _walk(below, graph.parents, None)
    if atom.parents:
        chosen |= _walk(base, graph.parents, atom.parents_depth)
    if atom.children:
        chosen |= _walk(base, graph.children, atom.children_depth)
    return chosen


def choose(args: Sequence[str], candidates: Sequence[Candidate], graph: Graph, *, option: str = "--select",
           default_schema: str, enabled_only: bool = False) -> set[str]:
    """The union of what ``args`` (values of ``option``) choose, disabled tables included.

    Raises:
        SelectionError: a selector malformed, or matching no registered table (with ``enabled_only``, a --select
            selector matching only disabled ones), naming it.
    """
    enabled = {c.name for c in candidates if c.enabled}
    chosen: set[str] = set()
    for arg in args:
        for part in parse(arg, default_schema, option):
            found: set[str] | None = None
            for atom in part:
                base = matches(atom, candidates)
                if not base:
                    raise SelectionError(f"{option} {atom.text!r} matches no registered table (bq-refresh tables list"
                                         " shows them and their tags)")
                reached = expand(atom, base, graph)
                if enabled_only and option == "--select" and not reached & enabled:
                    raise SelectionError(f"{option} {atom.text!r} matches only disabled tables ({', '.join(sorted(reached))}):"
                                         " bq-refresh tables enable NAME, or run --table NAME to run one anyway")
                found = reached if found is None else found & reached
            if not found:
                raise SelectionError(f"{option} {','.join(a.text for a in part)!r} selects no table (the"
                                     " comma-separated selectors have no table in common)")
            chosen |= found
    return chosen


def select(candidates: Sequence[Candidate], dependencies: Iterable[tuple[str, str]], select: Sequence[str] = (),
           exclude: Sequence[str] = (), *, default_schema: str, enabled_only: bool = False) -> Selection:
    """Resolve --select and --exclude over the registered tables, as dbt does over models: the union of the
    --select values (every table when there is none) minus the union of the --exclude values.

    Args:
        candidates: every registered table.
        dependencies: (parent, dependent) pairs of the registry.
        select: --select values; each may hold several selectors (space: union; comma: intersection).
        exclude: --exclude values, same syntax.
        default_schema: the schema of a name without one (BQ_REFRESH_SCHEMA).
        enabled_only: leave disabled tables out of the result (a run); a --select selector that matches only
            disabled tables is then an error.

    Raises:
        SelectionError: a selector malformed, or matching no registered table, naming it.
    """
    graph = Graph.of(dependencies)
    if select:
        chosen = choose(select, candidates, graph, default_schema=default_schema, enabled_only=enabled_only)
    else:
        chosen = {c.name for c in candidates if c.enabled or not enabled_only}
    chosen -= choose(exclude, candidates, graph, option="--exclude", default_schema=default_schema)
    left_out = {c.name for c in candidates if not c.enabled} & chosen if enabled_only else set()
    return Selection([c.name for c in candidates if c.name in chosen - left_out],
                     [c.name for c in candidates if c.name in left_out])
