"""Tables as code through the real entry point: bq-refresh export writes the registry as YAML (no state), apply
shows a plan and applies it all or nothing (--yes off a terminal, --plan-only, --prune), a bad file names the
table and the key and changes nothing; the shipped example file validates and round-trips."""

from __future__ import annotations

import json
import os
import pty
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from bq_refresh.errors import ConfigError
from bq_refresh.settings import Settings
from tasks.migrations import apply_migrations
from tasks.registry import add_dependency, list_dependencies, register_table
from tasks.tablesfile import (
    DependsOn,
    TableDecl,
    apply_tables,
    current_tables,
    dump_tables,
    parse_tables_file,
    plan_tables,
)
from tests.conftest import ROOT
from tests.test_cli_conventions import BIN, cli, one_error

pytestmark = pytest.mark.once
SPEC = {"source": "ds.sqp", "key": ["id"], "cursor": "updated_at"}


@pytest.fixture
def bq(env: Settings, pg: psycopg.Connection[Any]) -> Any:
    """bq-refresh as a subprocess on the test's (migrated) schema, off a terminal."""
    apply_migrations(pg, env.schema_name)
    environ = {**os.environ, "COLUMNS": "80"}

    def run(*args: str) -> Any:
        return cli(*args, env=environ, program=[str(BIN)])
    return run


def on_a_terminal(env: Settings, answer: str, *args: str) -> subprocess.CompletedProcess[str]:
    """bq-refresh with a terminal on stdin that types ``answer``."""
    main, terminal = pty.openpty()
    try:
        os.write(main, answer.encode())
        return subprocess.run([str(BIN), *args], cwd=ROOT, stdin=terminal, capture_output=True, text=True,
                              timeout=180, env={**os.environ, "COLUMNS": "80"})
    finally:
        os.close(main)
        os.close(terminal)


def registry(pg: psycopg.Connection[Any], schema: str) -> list[tuple[Any, ...]]:
    """Every registry row and dependency, state included: what "changes nothing" compares."""
    rows = pg.execute(f'SELECT table_schema, table_name, is_enabled, priority, refresh_frequency_hours, tags,'
                      f' custom_sync_params, watermark, last_refresh_at FROM "{schema}".refresh_config ORDER BY 1, 2')
    return [*rows.fetchall(), *sorted((d.parent, d.dependent, d.kind) for d in list_dependencies(pg, schema))]


def test_the_example_file_validates_applies_and_round_trips(bq: Any, env: Settings, pg: psycopg.Connection[Any],
                                                           tmp_path: Path) -> None:
    schema, example = env.schema_name, str(ROOT / "examples" / "tables.yaml")
    planned = bq("apply", "-f", example, "--plan-only")
    assert planned.returncode == 0, planned.stderr
    assert "8 to add, 0 to change, 0 to disable, 0 to delete" in planned.stdout and "plan only" in planned.stdout
    assert registry(pg, schema) == []

    applied = bq("apply", "-f", example, "--yes", "--json")
    assert applied.returncode == 0 and json.loads(applied.stdout)["applied"], applied.stderr
    tables = {d.name: d for d in current_tables(pg, schema)}
    assert [(n, d.priority, d.frequency_hours) for n, d in sorted(tables.items(), key=lambda t: -t[1].priority)] == [
        ("sqp.asin_performance_data", 100, 24), ("sqp.search_query_performance", 95, 24),
        ("sqp.search_performance_summary", 90, 24), ("sqp.daily_sqp_data", 85, 24), ("sqp.weekly_summary", 80, 24),
        ("sqp.monthly_summary", 75, 24), ("sqp.quarterly_summary", 70, 24), ("sqp.yearly_summary", 65, 24)]
    assert tables["sqp.search_performance_summary"].depends_on == [
        DependsOn(table="sqp.asin_performance_data"), DependsOn(table="sqp.search_query_performance")]
    assert len(list_dependencies(pg, schema)) == 6
    assert tables["sqp.weekly_summary"].tags == ["sqp", "summary"]

    # State is never in the file: a watermark and run times set now do not appear in the export.
    pg.execute(f"UPDATE \"{schema}\".refresh_config SET watermark = '2025-03-01T00:00:00+00:00',"
               " last_refresh_at = now() WHERE table_name = 'asin_performance_data'")
    out = tmp_path / "exported.yaml"
    assert bq("export", "-o", str(out)).returncode == 0
    text = out.read_text()
    assert "2025-03-01" not in text and "watermark" not in text and "last_refresh" not in text
    assert {k for t in yaml.safe_load(text)["tables"] for k in t} == {
        "name", "enabled", "priority", "frequency_hours", "tags", "depends_on", "custom_sync_params"}
    again = bq("apply", "-f", str(out))  # no --yes, off a terminal: nothing to ask when nothing changes
    assert again.returncode == 0 and "nothing to apply" in again.stdout, again.stderr
    assert "0 to add, 0 to change, 0 to disable, 0 to delete" in again.stdout


def test_apply_changes_disables_prunes_and_refuses_bad_files(bq: Any, env: Settings, pg: psycopg.Connection[Any],
                                                             tmp_path: Path) -> None:
    schema = env.schema_name
    for name in ("a", "b", "c"):
        register_table(pg, schema, name, SPEC)
    add_dependency(pg, schema, "a", "b")
    pg.execute(f"UPDATE \"{schema}\".refresh_config SET watermark = '42' WHERE table_name = 'a'")
    data = yaml.safe_load(bq("export").stdout)
    entry = {t["name"].split(".")[1]: t for t in data["tables"]}
    entry["a"].update(priority=7, tags=["core"])
    entry["a"]["custom_sync_params"]["lookback"] = "3d"
    entry["b"]["depends_on"] = [{"table": "a", "kind": "soft"}]  # a name without a schema: BQ_REFRESH_SCHEMA's
    data["tables"] = [entry["a"], entry["b"], {"name": "d", "depends_on": ["a"], "custom_sync_params": SPEC}]
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    before = registry(pg, schema)

    refused = bq("apply", "-f", str(changed))  # off a terminal without --yes: the plan, then exit 2
    assert one_error(refused, 2) == ("error: not on a terminal, so not asking: pass --yes to apply this plan (or"
                                     " --plan-only to only show it)")
    q = {n: f"{schema}.{n}" for n in "abcd"}
    for line in (f"plan for the registry in schema {schema} from {changed}: 1 to add, 2 to change, 1 to disable,"
                 " 0 to delete", f"  + {q['d']} (enabled; priority 100; every 24 h; depends on {q['a']} (hard))",
                 f"  ~ {q['a']}", "      priority: 100 -> 7", '      tags: [] -> ["core"]',
                 '      custom_sync_params.lookback: (none) -> "3d"', f"  ~ {q['b']}",
                 f'      depends_on: ["{q["a"]} (hard)"] -> ["{q["a"]} (soft)"]',
                 f"  - {q['c']} (disable: absent from the file)"):
        assert line in refused.stdout.splitlines(), (line, refused.stdout)
    assert registry(pg, schema) == before

    done = on_a_terminal(env, "y\n", "apply", "-f", str(changed))  # asked, and agreed
    assert done.returncode == 0 and "Apply this plan? [y/N]: " in done.stdout, done.stderr
    assert "applied: 1 added, 2 changed, 1 disabled, 0 deleted" in done.stdout
    rows = {r[1]: r for r in registry(pg, schema) if len(r) > 3}
    assert rows["a"][2:8] == (True, 7, 24, ["core"], {**SPEC, "lookback": "3d"}, "42")  # its watermark kept
    assert rows["c"][2] is False and rows["d"][2] is True
    assert {(d.parent, d.dependent, d.kind) for d in list_dependencies(pg, schema)} == {
        (q["a"], q["b"], "soft"), (q["a"], q["d"], "hard")}
    assert "nothing to apply" in bq("apply", "-f", str(changed)).stdout

    pruned = bq("apply", "-f", str(changed), "--prune", "--yes", "--json")
    assert json.loads(pruned.stdout) == {"add": [], "change": [], "disable": [], "delete": [q["c"]], "applied": True}
    assert sorted(r[1] for r in registry(pg, schema) if len(r) > 3) == ["a", "b", "d"]

    # A bad file names the table and the key, and changes nothing (the other changes in it are not made either).
    before = registry(pg, schema)
    entry["a"]["priority"] = 8
    changed.write_text(yaml.safe_dump({"tables": [entry["a"], entry["b"], {"name": "d", "priority": "high"},
                                                  {"name": "e", "custom_sync_params": SPEC}]}))
    said = one_error(bq("apply", "-f", str(changed), "--yes"), 2)
    assert said == f"error: {q['d']}: priority: Input should be a valid integer (in {changed})"
    assert registry(pg, schema) == before


GOOD = {"name": "b", "custom_sync_params": SPEC}


@pytest.mark.parametrize(("entry", "says"), [
    ({"name": "a", "priority": "high"}, "s.a: priority: Input should be a valid integer (in f.yaml)"),
    ({"name": "a", "frequency_hours": 0}, "s.a: frequency_hours: Input should be greater than 0 (in f.yaml)"),
    ({"name": "a", "custom_sync_params": {**SPEC, "mode": "sideways"}},
     "s.a: invalid sync parameters: mode: Input should be 'incremental', 'window' or 'full' (custom_sync_params, in"
     " f.yaml)"),
    ({"name": "a"}, "s.a: invalid sync parameters: key: Field required"),  # enabled needs its parameters
    ({"name": "a", "depends_on": ["b", "x.nowhere"], "custom_sync_params": SPEC},
     "s.a: depends_on: x.nowhere is not a table of f.yaml (add it, or remove the dependency)"),
    ({"name": "a", "depends_on": ["b", {"table": "s.b", "kind": "soft"}], "custom_sync_params": SPEC},
     "s.a: depends_on: s.b listed twice (in f.yaml)"),
    ({"name": "a", "depends_on": [{"table": "b", "kind": "weak"}], "custom_sync_params": SPEC},
     "s.a: depends_on.0.kind: Input should be 'hard' or 'soft' (in f.yaml)"),
    ({"name": "a", "depends_on": ["a"], "enabled": False}, "s.a: depends_on: a table cannot depend on itself"),
    ({"name": "a", "watermark": "43", "enabled": False},
     "s.a: watermark: not a key of a table (the keys: name, enabled, priority, frequency_hours, tags, depends_on,"
     " custom_sync_params) (in f.yaml)"),
    ({"name": "a", "tags": ["two words"], "enabled": False}, "s.a: tags: 'two words' is not a tag name"),
    ({"name": "b", "enabled": False}, "s.b: name: listed twice (in f.yaml)"),
    ({"priority": 3}, "tables[1]: name: Field required (in f.yaml)"),
])
def test_a_bad_entry_names_the_table_and_the_key(entry: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_tables_file(yaml.safe_dump({"tables": [GOOD, entry]}), "s", "f.yaml")
    assert str(raised.value).startswith(says), str(raised.value)


@pytest.mark.parametrize(("text", "says"), [
    ("tables: [", "f.yaml is not valid YAML at line 1, column 10"),
    ("- name: a\n", "f.yaml: give a mapping with one key, tables: a list of tables"),
    ("tables: []\nversion: 2\n", "f.yaml: give a mapping with one key, tables"),
    ("tables:\n- {name: b, depends_on: [a], enabled: false}\n- {name: a, depends_on: [b], enabled: false}\n",
     "s.b: depends_on: dependency cycle: s.b -> s.a -> s.b (in f.yaml)"),
], ids=["yaml", "not-a-mapping", "other-key", "cycle"])
def test_a_bad_file_says_where(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_tables_file(text, "s", "f.yaml")
    assert str(raised.value).startswith(says), str(raised.value)


def test_apply_is_one_transaction(env: Settings, pg: psycopg.Connection[Any]) -> None:
    """A refusal half-way through (here add_dependency's: a parent that is not registered, which a parsed file
    cannot hold) leaves the registry as it was: the tables registered and disabled before it are undone."""
    schema = env.schema_name
    apply_migrations(pg, schema)
    for name in ("a", "b"):
        register_table(pg, schema, name, SPEC)
    before = current_tables(pg, schema)
    desired = [TableDecl(name=f"{schema}.a", priority=1, custom_sync_params=SPEC),
               TableDecl(name=f"{schema}.n", custom_sync_params=SPEC, depends_on=[DependsOn(table=f"{schema}.ghost")])]
    assert plan_tables(desired, before).disable == [f"{schema}.b"]
    with pytest.raises(ConfigError, match="ghost: not registered"):
        apply_tables(pg, schema, desired)
    assert current_tables(pg, schema) == before
    with pytest.raises(ConfigError, match="the registry changed since the plan was shown; nothing applied"):
        apply_tables(pg, schema, desired[:1], shown=plan_tables(desired[:1], []))
    assert current_tables(pg, schema) == before


def test_parse_reads_back_what_export_writes() -> None:
    decls = [TableDecl(name="s.a", tags=["x"], custom_sync_params={
                 "query": "SELECT *\nFROM `p.d.t`\n", "key": ["id"], "mode": "full", "checks": {"ranges": {"v": [0, 1]}}}),
             TableDecl(name="s.b", enabled=False, depends_on=[DependsOn(table="s.a", kind="soft")])]
    text = dump_tables(decls)
    assert "query: |\n      SELECT *\n      FROM `p.d.t`\n" in text and "- {table: s.a, kind: soft}" in text
    assert parse_tables_file(text, "s") == decls
    assert plan_tables(parse_tables_file(text, "s"), decls).empty


def test_a_schema_before_tags_says_init(bq: Any, env: Settings, pg: psycopg.Connection[Any]) -> None:
    """Upgraded code on a schema of the version before (migration 008 not applied): one line naming init."""
    schema = env.schema_name
    register_table(pg, schema, "a", SPEC)
    pg.execute(f'ALTER TABLE "{schema}".refresh_config DROP COLUMN tags')
    pg.execute(f'DELETE FROM "{schema}".schema_migrations WHERE version = 8')
    said = one_error(bq("tables", "set", "a", "--tag", "x"), 2)
    assert said == (f'error: schema {schema} is not up to date (column "tags" of relation "refresh_config" does not'
                    " exist): run bq-refresh init")
    assert apply_migrations(pg, schema).applied == ["008_tags.sql"]
    assert register_table(pg, schema, "a", SPEC, tags=["x"]).tags == ["x"]
