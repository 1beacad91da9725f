"""Tables as code: the registry as a YAML file (bq-refresh export), and a file applied to it as a plan (apply)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator

from bq_refresh.errors import ConfigError
from tasks.planning import split_cycles
from tasks.registry import (
    Dependency,
    RegistryEntry,
    add_dependency,
    list_dependencies,
    list_entries,
    register_table,
    remove_dependency,
    remove_table,
    update_table,
)
from tasks.selection import valid_tags
from tasks.spec import TableSpec
from tasks.sqlnames import split_qualified

HEADER = """\
# bq-refresh tables file: the registry as code (README "Tables as code").
#   bq-refresh apply -f FILE     shows the plan (tables to add, change, disable) and applies it
#   bq-refresh export -o FILE    writes the registry as this file
# A registered table absent from the file is disabled (deleted with apply --prune). Watermarks and run times are
# state, not configuration: they are never in the file. custom_sync_params: README "Sync parameters".
"""
FIELDS = ("enabled", "priority", "frequency_hours", "tags", "depends_on", "custom_sync_params")


class DependsOn(BaseModel):
    """A table this one refreshes after: hard (skipped when the parent did not refresh) or soft."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    table: str = Field(min_length=1, description="schema.table of a table of the same file.")
    kind: Literal["hard", "soft"] = "hard"


class TableDecl(BaseModel):
    """One table of a tables file: its registry row, its dependencies and its sync parameters."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="schema.table (a name without a schema: BQ_REFRESH_SCHEMA's).")
    enabled: StrictBool = True
    priority: StrictInt = Field(default=100, description="Higher first, among tables that may run at once.")
    frequency_hours: StrictInt = Field(default=24, gt=0, description="Refresh every this many hours.")
    tags: list[str] = Field(default_factory=list, description="For run --select tag:NAME.")
    depends_on: list[DependsOn] = Field(default_factory=list, description="A name (hard) or {table, kind}.")
    custom_sync_params: dict[str, Any] = Field(default_factory=dict, description="The sync parameters.")

    @field_validator("depends_on", mode="before")
    @classmethod
    def _bare_names_are_hard(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"table": v} if isinstance(v, str) else v for v in value]
        return value


@dataclass(frozen=True)
class Change:
    """One field of a registered table that the file changes."""

    field: str  # e.g. "priority", "custom_sync_params.lookback"
    before: Any
    after: Any


@dataclass
class TablesPlan:
    """What applying a file does to the registry."""

    add: list[TableDecl] = field(default_factory=list)
    change: dict[str, list[Change]] = field(default_factory=dict)
    disable: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.add or self.change or self.disable or self.delete)

    def counts(self) -> str:
        return (f"{len(self.add)} to add, {len(self.change)} to change, {len(self.disable)} to disable,"
                f" {len(self.delete)} to delete")

    def done(self) -> str:
        return (f"{len(self.add)} added, {len(self.change)} changed, {len(self.disable)} disabled,"
                f" {len(self.delete)} deleted")

    def as_dict(self) -> dict[str, Any]:
        return {"add": [d.name for d in self.add],
                "change": [{"table": t, "changes": [c.__dict__ for c in cs]} for t, cs in self.change.items()],
                "disable": self.disable, "delete": self.delete}

    def lines(self) -> list[str]:
        """The plan as lines a person reads: + add, ~ change (each field, before -> after), - disable, x delete."""
        out = []
        for d in self.add:
            facts = ["enabled" if d.enabled else "disabled", f"priority {d.priority}", f"every {d.frequency_hours} h"]
            if d.tags:
                facts.append(f"tags {', '.join(d.tags)}")
            if d.depends_on:
                facts.append("depends on " + ", ".join(f"{p.table} ({p.kind})" for p in d.depends_on))
            out.append(f"  + {d.name} ({'; '.join(facts)})")
        for name, changes in self.change.items():
            out.append(f"  ~ {name}")
            out += [f"      {c.field}: {_shown(c.before)} -> {_shown(c.after)}" for c in changes]
        out += [f"  - {name} (disable: absent from the file)" for name in self.disable]
        out += [f"  x {name} (delete: absent from the file, --prune)" for name in self.delete]
        return out


def _shown(value: Any) -> str:
    if value is None:
        return "(none)"
    return json.dumps(value, default=str, sort_keys=True)


def _located(raw: Any, index: int, default_schema: str) -> str:
    """How an entry is named in an error: its name, else its position."""
    name = raw.get("name") if isinstance(raw, dict) else None
    return ".".join(split_qualified(name, default_schema)) if isinstance(name, str) and name else f"tables[{index}]"


def parse_tables_file(text: str, default_schema: str, label: str = "the tables file") -> list[TableDecl]:
    """Read and validate a tables file: every entry, its sync parameters (TableSpec) and its dependencies (names
    of the same file, no cycle). Names come back qualified; tags and dependencies sorted.

    A disabled table with empty sync parameters is a placeholder (a table discovered but not mapped yet).

    Raises:
        ConfigError: naming the table and the key (and ``label``), at the first problem.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{label} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict) or set(data) != {"tables"} or not isinstance(data["tables"], list):
        raise ConfigError(f"{label}: give a mapping with one key, tables: a list of tables (bq-refresh export"
                          " writes one)")
    decls: dict[str, TableDecl] = {}
    for index, raw in enumerate(data["tables"]):
        where = _located(raw, index, default_schema)
        try:
            decl = TableDecl.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(str(p) for p in first["loc"]) or "entry"
            why = (f"not a key of a table (the keys: name, {', '.join(FIELDS)})" if first["type"] == "extra_forbidden"
                   else first["msg"])
            raise ConfigError(f"{key}: {why} (in {label})", table=where) from None
        name = ".".join(split_qualified(decl.name, default_schema))
        if name in decls:
            raise ConfigError(f"name: listed twice (in {label})", table=name)
        parents: dict[str, DependsOn] = {}
        for dep in decl.depends_on:
            parent = ".".join(split_qualified(dep.table, default_schema))
            if parent in parents:
                raise ConfigError(f"depends_on: {parent} listed twice (in {label})", table=name)
            parents[parent] = DependsOn(table=parent, kind=dep.kind)
        if decl.enabled or decl.custom_sync_params:
            try:
                TableSpec.parse_for(name, decl.custom_sync_params)
            except ConfigError as exc:
                raise ConfigError(f"{str(exc).removeprefix(f'{name}: ')} (custom_sync_params, in {label})",
                                  table=name) from None
        try:
            tags = valid_tags(decl.tags, name)
        except ConfigError as exc:
            raise ConfigError(f"{str(exc).removeprefix(f'{name}: ')} (in {label})", table=name) from None
        decls[name] = decl.model_copy(update={
            "name": name, "tags": tags,
            "depends_on": [parents[p] for p in sorted(parents)]})
    for name, decl in decls.items():
        for dep in decl.depends_on:
            if dep.table == name:
                raise ConfigError(f"depends_on: a table cannot depend on itself (in {label})", table=name)
            if dep.table not in decls:
                raise ConfigError(f"depends_on: {dep.table} is not a table of {label} (add it, or remove the"
                                  " dependency)", table=name)
    edges = [(p.table, d.name, str(p.kind)) for d in decls.values() for p in d.depends_on]
    stuck = split_cycles({n: 0 for n in decls}, edges)[1]
    if stuck:
        name = next(n for n in decls if n in stuck)
        raise ConfigError(f"depends_on: {stuck[name]} (in {label})", table=name)
    return list(decls.values())


def declared(entries: list[RegistryEntry], dependencies: list[Dependency]) -> list[TableDecl]:
    """The registry as a tables file's entries, by name (state such as watermarks and run times left out)."""
    parents: dict[str, list[DependsOn]] = {}
    for d in sorted(dependencies, key=lambda d: (d.dependent, d.parent)):
        parents.setdefault(d.dependent, []).append(DependsOn(table=d.parent, kind="soft" if d.kind == "soft" else "hard"))
    return [TableDecl(name=e.name, enabled=e.is_enabled, priority=e.priority, frequency_hours=e.refresh_frequency_hours,
                      tags=sorted(e.tags), depends_on=parents.get(e.name, []), custom_sync_params=e.params)
            for e in sorted(entries, key=lambda e: e.name)]


def _changes(have: TableDecl, want: TableDecl) -> list[Change]:
    out = []
    for name in FIELDS:
        before, after = getattr(have, name), getattr(want, name)
        if name == "depends_on":
            before = [f"{p.table} ({p.kind})" for p in before]
            after = [f"{p.table} ({p.kind})" for p in after]
        if name == "custom_sync_params":
            for key in sorted(set(before) | set(after)):
                if before.get(key) != after.get(key):
                    out.append(Change(f"custom_sync_params.{key}", before.get(key), after.get(key)))
        elif before != after:
            out.append(Change(name, before, after))
    return out


def plan_tables(desired: list[TableDecl], current: list[TableDecl], *, prune: bool = False) -> TablesPlan:
    """What applying ``desired`` to a registry holding ``current`` does: add the tables it lacks, change the
    fields that differ, disable the enabled tables the file does not list (delete every one of them, ``prune``).
    A pure function of the two lists."""
    have = {d.name: d for d in current}
    want = {d.name for d in desired}
    plan = TablesPlan()
    for d in desired:
        if d.name not in have:
            plan.add.append(d)
        elif changes := _changes(have[d.name], d):
            plan.change[d.name] = changes
    absent = [d for d in current if d.name not in want]
    if prune:
        plan.delete = [d.name for d in absent]
    else:
        plan.disable = [d.name for d in absent if d.enabled]
    return plan


def current_tables(conn: psycopg.Connection[Any], schema: str) -> list[TableDecl]:
    """The registry as a tables file's entries."""
    return declared(list_entries(conn, schema), list_dependencies(conn, schema))


def apply_tables(conn: psycopg.Connection[Any], schema: str, desired: list[TableDecl], *, prune: bool = False,
                 shown: TablesPlan | None = None) -> TablesPlan:
    """Apply a validated file to the registry in one transaction: all of it or, at any error, nothing.

    Args:
        conn: an autocommit connection (the transaction is this function's).
        shown: the plan the user agreed to; when the registry changed since, nothing is applied.

    Raises:
        ConfigError: the registry changed since ``shown``; a table refused by register_table (naming it).
        DependencyCycle: a dependency refused by add_dependency (with a table of the registry the file does not
            list); nothing is applied either way.
    """
    with conn.transaction():
        current = current_tables(conn, schema)
        plan = plan_tables(desired, current, prune=prune)
        if shown is not None and plan != shown:
            raise ConfigError("the registry changed since the plan was shown; nothing applied: run bq-refresh"
                              " apply again")
        for name in plan.delete:
            remove_table(conn, schema, name)
        for name in plan.disable:
            update_table(conn, schema, name, enabled=False)
        had = {d.name: d for d in current}
        for d in desired:
            changed = {c.field.split(".")[0] for c in plan.change.get(d.name, [])}
            if d.name not in had or changed - {"depends_on"}:
                register_table(conn, schema, d.name, d.custom_sync_params, priority=d.priority,
                               frequency_hours=d.frequency_hours, enabled=d.enabled, tags=d.tags)
        # Every dependency the file drops goes before any it adds: no cycle in between that the file has not.
        for d in desired:
            wanted = {p.table for p in d.depends_on}
            for p in had[d.name].depends_on if d.name in had else []:
                if p.table not in wanted:
                    remove_dependency(conn, schema, p.table, d.name)
        for d in desired:
            before = {p.table: p.kind for p in had[d.name].depends_on} if d.name in had else {}
            for p in d.depends_on:
                if before.get(p.table) != p.kind:
                    add_dependency(conn, schema, p.table, d.name, p.kind)
    return plan


class _Dumper(yaml.SafeDumper):
    """Block style for tables and parameters; short lists and {table, kind} inline; SQL as a literal block."""

    def ignore_aliases(self, data: Any) -> bool:
        return True  # never &id001 / *id001: a person reads and edits the file


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    dependencies = bool(value) and all(isinstance(v, dict) and set(v) <= {"table", "kind"} for v in value)
    inline = not dependencies and all(_scalar(v) or (isinstance(v, list) and all(map(_scalar, v))) for v in value)
    node = dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=inline)
    if dependencies:  # one a line, each {table: ..., kind: ...}
        for item in node.value:
            item.flow_style = True
    return node


_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(list, _represent_list)


def dump_tables(decls: list[TableDecl]) -> str:
    """A tables file holding ``decls`` (what parse_tables_file reads back equal)."""
    body = {"tables": [d.model_dump(mode="json") for d in decls]}
    return HEADER + str(yaml.dump(body, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110,
                                  default_flow_style=False))
