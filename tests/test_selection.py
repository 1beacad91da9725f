"""Selection as dbt users know it, as pure cases: globs on schema.table, tag:, the graph operators +, N+ and @,
unions and intersections, --exclude, disabled tables left out of a run, and errors naming the selector."""

from __future__ import annotations

import json
import os
from typing import Any

import psycopg
import pytest

from blocks import BigQuerySource
from bq_refresh.errors import ConfigError
from bq_refresh.settings import Settings
from tasks.migrations import apply_migrations
from tasks.registry import add_dependency, get_entry, register_table
from tasks.selection import Candidate, SelectionError, parse_atom, select, valid_tags
from tests.bqdata import put_table
from tests.test_cli_conventions import BIN, cli, one_error
from tests.test_engine import SQP_KEY, SQP_SCHEMA, sqp_rows

pytestmark = [pytest.mark.once, pytest.mark.second]

# sqp.a -> sqp.b -> sqp.c -> sqp.e, sqp.d -> sqp.c, sqp.c -> sqp.g (disabled); other.f apart.
TABLES = [
    Candidate("sqp.a", frozenset({"base", "nightly"})),
    Candidate("sqp.b", frozenset({"nightly"})),
    Candidate("sqp.c"),
    Candidate("sqp.d", frozenset({"weekly"})),
    Candidate("sqp.e"),
    Candidate("other.f", frozenset({"nightly"})),
    Candidate("sqp.g", frozenset({"weekly"}), enabled=False),
]
DEPS = [("sqp.a", "sqp.b"), ("sqp.b", "sqp.c"), ("sqp.c", "sqp.e"), ("sqp.d", "sqp.c"), ("sqp.c", "sqp.g")]


def chosen(sel: list[str], exclude: list[str] | None = None, *, enabled_only: bool = False) -> list[str]:
    picked = select(TABLES, DEPS, sel, exclude or [], default_schema="sqp", enabled_only=enabled_only)
    return [n.removeprefix("sqp.") for n in picked.tables]


@pytest.mark.parametrize(("sel", "expected"), [
    (["sqp.*"], ["a", "b", "c", "d", "e", "g"]),
    (["*"], ["a", "b", "c", "d", "e", "g"]),  # a name without a schema is BQ_REFRESH_SCHEMA's, as for --table
    (["*.*"], ["a", "b", "c", "d", "e", "other.f", "g"]),
    (["sqp.[ab]"], ["a", "b"]),
    (["c"], ["c"]),
    (["other.f"], ["other.f"]),
    (["tag:nightly"], ["a", "b", "other.f"]),
    (["tag:night*"], ["a", "b", "other.f"]),
    (["+c"], ["a", "b", "c", "d"]),  # the table and everything it depends on, transitively
    (["c+"], ["c", "e", "g"]),  # the table and everything that depends on it
    (["+c+"], ["a", "b", "c", "d", "e", "g"]),
    (["1+c"], ["b", "c", "d"]),  # parents only
    (["2+e"], ["b", "c", "d", "e"]),
    (["a+1"], ["a", "b"]),
    (["@b"], ["a", "b", "c", "d", "e", "g"]),  # b, its descendants, and every ancestor of those
    (["+tag:weekly"], ["a", "b", "c", "d", "g"]),
    (["tag:nightly,sqp.*"], ["a", "b"]),  # comma: intersection
    (["a d"], ["a", "d"]),  # space: union
    (["a", "tag:weekly"], ["a", "d", "g"]),  # repeated --select: union
    ([], ["a", "b", "c", "d", "e", "other.f", "g"]),  # no --select: everything
])
def test_select(sel: list[str], expected: list[str]) -> None:
    assert chosen(sel) == expected


@pytest.mark.parametrize(("sel", "exclude", "expected"), [
    (["sqp.*"], ["c+"], ["a", "b", "d"]),
    (["+e"], ["tag:nightly"], ["c", "d", "e"]),
    ([], ["sqp.*"], ["other.f"]),
    (["tag:nightly"], ["other.*", "a"], ["b"]),
])
def test_exclude_removes(sel: list[str], exclude: list[str], expected: list[str]) -> None:
    assert chosen(sel, exclude) == expected


def test_a_run_leaves_disabled_tables_out_and_says_so() -> None:
    picked = select(TABLES, DEPS, ["c+"], default_schema="sqp", enabled_only=True)
    assert (picked.tables, picked.left_out_disabled) == (["sqp.c", "sqp.e"], ["sqp.g"])
    assert chosen([], enabled_only=True) == ["a", "b", "c", "d", "e", "other.f"]
    # A disabled table on the way still leads to its ancestors: +x runs what x depends on.
    picked = select(TABLES, [*DEPS, ("sqp.e", "sqp.g")], ["+g"], default_schema="sqp", enabled_only=True)
    assert picked.tables == ["sqp.a", "sqp.b", "sqp.c", "sqp.d", "sqp.e"] and picked.left_out_disabled == ["sqp.g"]


@pytest.mark.parametrize(("sel", "exclude", "says"), [
    (["nope"], [], "--select 'nope' matches no registered table"),
    (["a", "tag:none"], [], "--select 'tag:none' matches no registered table"),
    (["+sqp.zz*"], [], "--select '+sqp.zz*' matches no registered table"),
    (["a"], ["tag:typo"], "--exclude 'tag:typo' matches no registered table"),
    (["tag:weekly,tag:nightly"], [], "--select 'tag:weekly,tag:nightly' selects no table"),
    (["path:models"], [], "--select 'path:models': unknown selector method 'path'"),
    (["@+a"], [], "--select '@+a': @ cannot be combined with +"),
    (["+"], [], "--select '+': give a schema.table glob or tag:NAME"),
    (["  "], [], "--select '  ': empty selector"),
])
def test_errors_name_the_selector(sel: list[str], exclude: list[str], says: str) -> None:
    with pytest.raises(SelectionError) as raised:
        chosen(sel, exclude)
    assert str(raised.value).startswith(says), str(raised.value)
    assert isinstance(raised.value, ConfigError)  # exit 2 through the command line's explain()


def test_a_run_refuses_a_selector_of_disabled_tables_only() -> None:
    with pytest.raises(SelectionError, match=r"--select 'g' matches only disabled tables \(sqp.g\): bq-refresh"
                                             r" tables enable NAME, or run --table NAME"):
        chosen(["g"], enabled_only=True)
    assert chosen(["g"]) == ["g"]  # tables list shows it


def test_atoms_parse_as_dbt_reads_them() -> None:
    atom = parse_atom("2+tag:nightly+", "sqp")
    assert (atom.method, atom.value, atom.parents, atom.parents_depth, atom.children, atom.children_depth) == \
        ("tag", "nightly", True, 2, True, None)
    assert parse_atom("t", "reg").value == "reg.t" and parse_atom("x.t", "reg").value == "x.t"
    assert parse_atom("@t", "s").childrens_parents


@pytest.mark.parametrize("bad", ["", "a b", "a,b", "x:y", "-a", "é"])
def test_tag_names(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^sqp\.t: tags: .* is not a tag name"):
        valid_tags([bad], "sqp.t")
    assert valid_tags(["b", "a-1", "b", "x.y_z"], "sqp.t") == ["a-1", "b", "x.y_z"]


@pytest.mark.emulator
@pytest.mark.usefixtures("prefect_harness")
def test_run_select_through_the_command_line(env: Settings, pg: psycopg.Connection[Any]) -> None:
    """bq-refresh run --select as a subprocess: exactly the tables chosen run, ancestors first; tags set and shown
    by tables add/set/list/show; a selector that matches nothing is exit 2 naming it, before Prefect starts."""
    from prefect.settings import PREFECT_API_URL

    schema = env.schema_name
    apply_migrations(pg, schema)
    put_table(BigQuerySource.from_settings(env), "sqp", SQP_SCHEMA, sqp_rows(6))
    spec = {"source": "sqp", "key": SQP_KEY, "cursor": "updated_at"}
    environ = {**os.environ, "COLUMNS": "80", "PREFECT_API_URL": str(PREFECT_API_URL.value())}

    def bq(*args: str) -> Any:
        return cli(*args, env=environ, program=[str(BIN)])

    # a -> b -> c -> e; d and f apart; g disabled, tagged like d.
    for name, priority in (("a", 100), ("b", 90), ("c", 80), ("e", 70), ("f", 60)):
        register_table(pg, schema, name, spec, priority=priority)
    register_table(pg, schema, "g", spec, enabled=False, tags=["weekly"])
    added = bq("tables", "add", "d", "--source", "sqp", "--key", ",".join(SQP_KEY), "--cursor", "updated_at",
               "--priority", "95", "--tag", "weekly", "--tag", "sqp", "--json")
    assert added.returncode == 0 and json.loads(added.stdout)["tags"] == ["sqp", "weekly"], added.stderr
    for parent, child in (("a", "b"), ("b", "c"), ("c", "e")):
        add_dependency(pg, schema, parent, child)
    register_table(pg, schema, "f", spec, priority=60, tags=["old", "weekly"])
    assert bq("tables", "set", "f", "--no-tags", "--tag", "misc").returncode == 0
    assert get_entry(pg, schema, "f").tags == ["misc"]
    assert bq("tables", "set", "d", "--no-tag", "sqp").returncode == 0
    assert one_error(bq("tables", "set", "d", "--no-tag", "sqp"), 2) == f"error: {schema}.d: has no tag sqp (its tags: weekly)"
    listed = bq("tables", "list", "--select", "tag:weekly", "--select", "c+", "--exclude", "e", "--json")
    assert [(r["table"], r["tags"], r["enabled"]) for r in json.loads(listed.stdout)] == [
        (f"{schema}.g", ["weekly"], False), (f"{schema}.d", ["weekly"], True), (f"{schema}.c", [], True)]
    assert json.loads(bq("tables", "show", "d", "--json").stdout)["tags"] == ["weekly"]

    # Errors: one line, exit 2, naming the selector, nothing run.
    nothing = one_error(bq("run", "--select", "+nope"), 2)
    assert nothing.startswith("error: --select '+nope' matches no registered table"), nothing
    assert "leaves out every table" in one_error(bq("run", "--select", "tag:weekly", "--exclude", "d"), 2)

    # +c: c and everything it depends on (a, b), in dependency order; tag:weekly: d (g is disabled: left out).
    ran = bq("run", "--select", "+c", "--select", "tag:weekly", "--json")
    assert ran.returncode == 0, ran.stderr[-3000:]
    summary = json.loads(ran.stdout)
    q = {n: f"{schema}.{n}" for n in "abcdefg"}
    assert {r["table"]: r["status"] for r in summary["tables"]} == {q[n]: "success" for n in "abcd"}
    assert summary["waves"] == [[q["a"], q["d"]], [q["b"]], [q["c"]]]
    assert summary["selected"] == [q["a"], q["d"], q["b"], q["c"]] and summary["left_out_disabled"] == [q["g"]]
    audited = pg.execute(f'SELECT table_name, count(*) FROM "{schema}".refresh_audit_log GROUP BY 1').fetchall()
    assert dict(audited) == {"a": 1, "b": 1, "c": 1, "d": 1}
    assert pg.execute(f'SELECT count(*) FROM "{schema}".c').fetchone() == (6,)
