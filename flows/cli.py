"""The bq-refresh command line.

Exit codes, for scripts (README "Command line"): 0 all good; 1 a table failed or a check found a difference;
2 usage or configuration (an option, a setting, the registry); 3 a service (PostgreSQL, BigQuery) unreachable.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from bq_refresh.offline import configure_offline_prefect

configure_offline_prefect()

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from bq_refresh.errors import (  # noqa: E402
    ConfigError,
    DependencyCycle,
    RefreshError,
    SourceUnavailable,
    TargetUnavailable,
)
from bq_refresh.settings import load_settings  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

app = typer.Typer(no_args_is_help=True, add_completion=True, help="Keep PostgreSQL tables in sync with BigQuery.")
# Full-width tables in logs and CI too; a message is never wrapped (soft_wrap): one error, one line for scripts.
console = Console(width=None if sys.stdout.isatty() else 150, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)
DEBUG = {"on": False}

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
TableName = Annotated[str, typer.Argument(help="Registered table: schema.table, or table in BQ_REFRESH_SCHEMA.")]
SelectOption = Annotated[list[str] | None, typer.Option(
    "--select", "-s", help="Tables as dbt selects models (repeatable): a schema.table glob ('sqp.*'), tag:NAME,"
    " +NAME (and what it depends on), NAME+ (and what depends on it), @NAME; 'a b' is a union, 'a,b' an"
    " intersection.")]
ExcludeOption = Annotated[list[str] | None, typer.Option(
    "--exclude", help="Leave out these tables (repeatable; the --select syntax).")]
TagOption = Annotated[list[str] | None, typer.Option("--tag", help="Tag (repeatable), for run --select tag:NAME.")]


class SyncMode(StrEnum):
    """How a table is read (the sync parameters' mode)."""

    incremental = "incremental"
    window = "window"
    full = "full"


class AuditStatus(StrEnum):
    """The status of an audit row (refresh_audit_log.status)."""

    running = "running"
    success = "success"
    failed = "failed"
    warning = "warning"
    skipped = "skipped"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"bq-refresh {version('bq-refresh')}")
        except PackageNotFoundError:  # a source tree that was never installed
            typer.echo("bq-refresh (not installed)")
        raise typer.Exit()


def _json_object(value: str | None) -> str | None:
    """Validate a --params value: a JSON object (a usage error naming --params otherwise)."""
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON ({exc.msg} at column {exc.colno}); give a JSON object, "
                                 """e.g. '{"lookback": "3d"}'""") from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter(f"""give a JSON object, e.g. '{{"lookback": "3d"}}', not {type(parsed).__name__}""")
    return value


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    _show_version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False,
) -> None:
    DEBUG["on"] = debug


def _emit(data: Any, as_json: bool) -> bool:
    if as_json:
        typer.echo(json.dumps(data, default=str, indent=2))
    return as_json


def _conn() -> Any:
    from blocks import resolve_resources

    settings = load_settings()
    return resolve_resources(settings).target.connect(autocommit=True), settings


@app.command()
def init(as_json: JsonOption = False) -> None:
    """Create or upgrade the refresh system's schema (idempotent)."""
    from tasks.migrations import apply_migrations

    conn, settings = _conn()
    with conn:
        report = apply_migrations(conn, settings.schema_name, settings.staging_schema)
    data = {
        "schema": settings.schema_name,
        "applied": report.applied,
        "already_applied": report.already_applied,
        "event_trigger": report.event_trigger,
    }
    if not _emit(data, as_json):
        console.print(f"schema [bold]{settings.schema_name}[/]: applied {len(report.applied)} migration(s), "
                      f"{len(report.already_applied)} already there; auto-registration trigger: {report.event_trigger}")


tables_app = typer.Typer(no_args_is_help=True, help="The registry of tables to refresh.")
app.add_typer(tables_app, name="tables")


@tables_app.command("add")
def tables_add(
    name: Annotated[str, typer.Argument(help="Target table: schema.table or table (default schema).")],
    source: Annotated[str | None, typer.Option(help="BigQuery table: project.dataset.table, dataset.table or table.")] = None,
    query: Annotated[str | None, typer.Option(help="A SQL query as the source, instead of --source.")] = None,
    key: Annotated[str, typer.Option(help="Key columns, comma-separated.")] = "",
    cursor: Annotated[str | None, typer.Option(help="Cursor column for incremental reads.")] = None,
    mode: Annotated[SyncMode, typer.Option(help="incremental (rows past the cursor), window (whole periods"
                                                " restated) or full (everything, every run).")] = SyncMode.incremental,
    window_column: Annotated[str | None, typer.Option(help="Period column (window mode).")] = None,
    lookback: Annotated[str, typer.Option(help="Re-read window behind the watermark, e.g. 7d.")] = "0",
    params: Annotated[str | None, typer.Option(help="More sync parameters as a JSON object.",
                                               callback=_json_object)] = None,
    priority: Annotated[int, typer.Option(help="Higher first, among tables that may run at the same time.")] = 100,
    frequency_hours: Annotated[int, typer.Option(help="Refresh every this many hours (24: nightly).")] = 24,
    disabled: Annotated[bool, typer.Option("--disabled", help="Register it disabled (not refreshed).")] = False,
    tag: TagOption = None,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Check the source in BigQuery first: it exists,"
                                        " the key, cursor and window columns are there with usable types, a read"
                                        " session opens (bq-refresh doctor's source lines).")] = True,
    as_json: JsonOption = False,
) -> None:
    """Register (or update) a table; its sync parameters are validated first, and its source checked."""
    from tasks.registry import register_table

    spec: dict[str, Any] = json.loads(params) if params else {}
    for k, v in {"source": source, "query": query, "cursor": cursor, "window_column": window_column}.items():
        if v is not None:
            spec[k] = v
    if key:
        spec["key"] = [k.strip() for k in key.split(",") if k.strip()]
    spec.setdefault("mode", mode.value)
    if lookback != "0":
        spec["lookback"] = lookback
    conn, settings = _conn()
    with conn:
        if check:  # a typo in a column is found now, not at 02:00: nothing is registered
            from blocks import resolve_resources
            from tasks import doctor as preflight
            from tasks.registry import RegistryEntry
            from tasks.spec import TableSpec
            from tasks.sqlnames import split_qualified

            table_schema, table_name = split_qualified(name, settings.schema_name)
            TableSpec.parse_for(f"{table_schema}.{table_name}", spec)  # bad parameters: worded as registration does
            provisional = RegistryEntry(0, table_schema, table_name, True, frequency_hours, priority, None, None, None,
                                        None, spec)
            failed = [c for c in preflight.source_checks(resolve_resources(settings), provisional)
                      if c["status"] == "fail"]
            if failed:
                raise ConfigError(f"not registered: {'; '.join(c['message'] for c in failed)} (--no-check registers"
                                  " without looking at BigQuery)", table=provisional.name)
        entry = register_table(conn, settings.schema_name, name, spec, priority=priority,
                               frequency_hours=frequency_hours, enabled=not disabled, tags=tag)
    if not _emit({"id": entry.id, "table": entry.name, "tags": entry.tags, "params": entry.params}, as_json):
        console.print(f"registered [bold]{entry.name}[/] (id {entry.id})")


@tables_app.command("list")
def tables_list(select: SelectOption = None, exclude: ExcludeOption = None, as_json: JsonOption = False) -> None:
    """List registered tables (those --select and --exclude choose, disabled ones too)."""
    from rich.table import Table

    from tasks.registry import list_dependencies, list_entries
    from tasks.selection import Candidate
    from tasks.selection import select as resolve

    conn, settings = _conn()
    with conn:
        entries = list_entries(conn, settings.schema_name)
        if select or exclude:
            pairs = [(d.parent, d.dependent) for d in list_dependencies(conn, settings.schema_name)]
            chosen = set(resolve([Candidate(e.name, frozenset(e.tags), e.is_enabled) for e in entries], pairs,
                                 select or [], exclude or [], default_schema=settings.schema_name).tables)
            entries = [e for e in entries if e.name in chosen]
    rows: list[dict[str, Any]] = [
        {"table": e.name, "enabled": e.is_enabled, "priority": e.priority, "frequency_hours": e.refresh_frequency_hours,
         "tags": e.tags, "last_refresh_at": e.last_refresh_at, "next_refresh_at": e.next_refresh_at,
         "watermark": e.watermark, "mode": e.params.get("mode")} for e in entries]
    if _emit(rows, as_json):
        return
    table = Table("table", "enabled", "priority", "mode", "tags", "last refresh", "next due", "watermark")
    for r in rows:
        table.add_row(str(r["table"]), str(r["enabled"]), str(r["priority"]), str(r["mode"]), ", ".join(r["tags"]) or "-",
                      str(r["last_refresh_at"] or "-"), str(r["next_refresh_at"] or "-"), str(r["watermark"] or "-"))
    console.print(table)


def _print_rows(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    from rich.table import Table

    table = Table(*columns, title=title)
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in columns))
    console.print(table if rows else f"({title or 'nothing'}: no rows)")


@tables_app.command("show")
def tables_show(name: TableName, as_json: JsonOption = False) -> None:
    """Show one table's registry row and sync parameters."""
    from tasks.registry import get_entry, list_dependencies

    conn, settings = _conn()
    with conn:
        e = get_entry(conn, settings.schema_name, name)
        deps = [d.__dict__ for d in list_dependencies(conn, settings.schema_name) if e.name in (d.parent, d.dependent)]
    data = {"table": e.name, "enabled": e.is_enabled, "priority": e.priority, "frequency_hours": e.refresh_frequency_hours,
            "tags": e.tags, "last_refresh_at": e.last_refresh_at, "next_refresh_at": e.next_refresh_at, "watermark": e.watermark,
            "params": e.params, "dependencies": deps}
    if not _emit(data, as_json):
        console.print_json(json.dumps(data, default=str))


def _set_enabled(name: str, enabled: bool) -> None:
    from tasks.registry import update_table

    conn, settings = _conn()
    with conn:
        e = update_table(conn, settings.schema_name, name, enabled=enabled)
    console.print(f"{e.name} {'enabled' if enabled else 'disabled'}")


@tables_app.command("enable")
def tables_enable(
    name: Annotated[str | None, typer.Argument(help="Registered table: schema.table, or table in BQ_REFRESH_SCHEMA.")]
    = None,
    all_: Annotated[bool, typer.Option("--all", help="Enable every disabled table (after bq-refresh rollback).")]
    = False,
) -> None:
    """Enable a table, or every disabled one (--all)."""
    if (name is None) == (not all_):
        raise typer.BadParameter("give a table or --all (one of them)", param_hint="'NAME' / '--all'")
    if name is not None:
        _set_enabled(name, True)
        return
    from tasks.registry import enable_all

    conn, settings = _conn()
    with conn:
        enabled = enable_all(conn, settings.schema_name)
    console.print(f"{len(enabled)} table(s) enabled" + (f": {', '.join(enabled)}" if enabled else ""))


@tables_app.command("disable")
def tables_disable(name: TableName) -> None:
    """Disable a table (it is no longer refreshed)."""
    _set_enabled(name, False)


@tables_app.command("remove")
def tables_remove(name: TableName) -> None:
    """Unregister a table (the live table and its audit rows stay)."""
    from tasks.registry import remove_table

    conn, settings = _conn()
    with conn:
        remove_table(conn, settings.schema_name, name)
    console.print(f"{name} removed from the registry")


@tables_app.command("set")
def tables_set(
    name: TableName,
    priority: Annotated[int | None, typer.Option(help="Higher first, among tables that may run at the same time.")]
    = None,
    frequency_hours: Annotated[int | None, typer.Option(help="Refresh every this many hours (24: nightly).")] = None,
    params: Annotated[str | None, typer.Option(help="Sync parameters to merge, as a JSON object.",
                                               callback=_json_object)] = None,
    depends_on: Annotated[list[str] | None, typer.Option(help="Parent table (repeatable): hard dependency.")] = None,
    soft_depends_on: Annotated[list[str] | None, typer.Option(help="Parent table (repeatable): soft dependency.")] = None,
    no_depends_on: Annotated[list[str] | None, typer.Option(
        "--no-depends-on", help="Parent table (repeatable): remove the dependency on it (hard or soft).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Add this tag (repeatable).")] = None,
    no_tag: Annotated[list[str] | None, typer.Option("--no-tag", help="Remove this tag (repeatable).")] = None,
    no_tags: Annotated[bool, typer.Option("--no-tags", help="Remove every tag (before any --tag).")] = False,
) -> None:
    """Change priority, frequency, sync parameters, tags or dependencies of a table (all or nothing: a dependency
    cycle, like any invalid change, is refused with nothing changed)."""
    from tasks.registry import add_dependency, get_entry, remove_dependency, update_table

    conn, settings = _conn()
    with conn, conn.transaction():
        tags = None
        if tag or no_tag or no_tags:
            had = get_entry(conn, settings.schema_name, name)
            missing = sorted(set(no_tag or []) - set(had.tags))
            if missing:
                raise ConfigError(f"has no tag {', '.join(missing)} (its tags: {', '.join(had.tags) or 'none'})",
                                  table=had.name)
            tags = sorted((set() if no_tags else set(had.tags) - set(no_tag or [])) | set(tag or []))
        e = update_table(conn, settings.schema_name, name, priority=priority, frequency_hours=frequency_hours,
                         params=json.loads(params) if params else None, tags=tags)
        for parent in no_depends_on or []:
            remove_dependency(conn, settings.schema_name, parent, e.name)
        for parent in depends_on or []:
            add_dependency(conn, settings.schema_name, parent, e.name, "hard")
        for parent in soft_depends_on or []:
            add_dependency(conn, settings.schema_name, parent, e.name, "soft")
    console.print(f"{e.name} updated")


@app.command("export")
def export_tables_file(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file (default: stdout).",
                                                dir_okay=False)] = None,
) -> None:
    """Write the registry as a tables file (YAML): each table's settings, tags, dependencies and sync parameters,
    never its watermark or run times. bq-refresh apply -f FILE applies it."""
    from tasks.tablesfile import current_tables, dump_tables

    conn, settings = _conn()
    with conn:
        tables = current_tables(conn, settings.schema_name)
    if output is None:
        typer.echo(dump_tables(tables), nl=False)
    else:
        output.write_text(dump_tables(tables))
        err_console.print(f"wrote {len(tables)} table(s) to {output}", markup=False)


@app.command("apply")
def apply_tables_file(
    file: Annotated[str, typer.Option("--file", "-f", help="The tables file (YAML; - for stdin), as bq-refresh"
                                      " export writes it.")],
    yes: Annotated[bool, typer.Option("--yes", help="Apply without asking (needed off a terminal).")] = False,
    plan_only: Annotated[bool, typer.Option("--plan-only", "--dry-run", help="Show the plan, change nothing.")] = False,
    prune: Annotated[bool, typer.Option("--prune", help="Delete the registered tables absent from the file"
                                        " (default: disable them).")] = False,
    as_json: JsonOption = False,
) -> None:
    """Make the registry what the file says: shows the plan (tables to add, change, disable) and applies it in one
    transaction, all or nothing. Tables absent from the file are disabled, never deleted unless --prune."""
    from tasks.tablesfile import apply_tables, current_tables, parse_tables_file, plan_tables

    label = "stdin" if file == "-" else file
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {file}: {exc.strerror}", param_hint="'--file' / '-f'") from None
    desired = parse_tables_file(text, load_settings().schema_name, label)  # a bad file is said before connecting
    conn, settings = _conn()
    with conn:
        plan = plan_tables(desired, current_tables(conn, settings.schema_name), prune=prune)
        ask = not (plan.empty or plan_only or yes)
        if not as_json:
            typer.echo(f"plan for the registry in schema {settings.schema_name} from {label}: {plan.counts()}")
            for line in plan.lines():
                typer.echo(line)
        if ask and not sys.stdin.isatty():
            _emit({**plan.as_dict(), "applied": False}, as_json)
            raise ConfigError("not on a terminal, so not asking: pass --yes to apply this plan (or --plan-only to"
                              " only show it)")
        if ask:
            typer.confirm("Apply this plan?", abort=True)
        applied = not (plan.empty or plan_only)
        if applied:
            apply_tables(conn, settings.schema_name, desired, prune=prune, shown=plan)
    if not _emit({**plan.as_dict(), "applied": applied}, as_json):
        typer.echo(f"applied: {plan.done()}" if applied else
                   "nothing to apply: the registry is as the file says" if plan.empty else
                   "plan only: nothing changed")


@app.command()
def status(as_json: JsonOption = False) -> None:
    """Per table: last result, data as of (its age against its frequency), next due, health."""
    from tasks import status as q

    conn, settings = _conn()
    with conn:
        rows = [t.as_dict() for t in q.table_status(conn, settings.schema_name, grace_hours=settings.health_grace_hours)]
    if not _emit(rows, as_json):
        for r in rows:
            r["health"] = "ok" if r["healthy"] else f"[red]{r['reason']}[/]"
        _print_rows(rows, ["table", "enabled", "last_status", "data_as_of", "age_hours", "frequency_hours",
                           "next_refresh_at", "health"], "status")


@app.command()
def history(
    table: Annotated[str | None, typer.Option(help="Only this table's rows.")] = None,
    status_: Annotated[AuditStatus | None, typer.Option("--status", help="Only rows with this status.")] = None,
    since: Annotated[datetime | None, typer.Option(help="Only runs started at or after this time.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Audit rows, newest first."""
    from tasks import status as q

    conn, settings = _conn()
    with conn:
        rows = q.history(conn, settings.schema_name, table=table, status=status_.value if status_ else None,
                         since=since, limit=limit)
    if not _emit(rows, as_json):
        _print_rows(rows, ["id", "table_name", "status", "refresh_started_at", "rows_processed", "rows_inserted",
                           "rows_updated", "rows_deleted", "execution_time_ms", "error_message"], "history")


@app.command()
def quality(table: Annotated[str | None, typer.Option(help="Only this table's checks.")] = None,
            as_json: JsonOption = False) -> None:
    """Data-quality check results."""
    from tasks import status as q

    conn, settings = _conn()
    with conn:
        rows = q.quality(conn, settings.schema_name, table=table)
    if not _emit(rows, as_json):
        _print_rows(rows, ["table", "metric_name", "metric_value", "expected_value", "threshold_min", "threshold_max",
                           "is_within_threshold", "created_at"], "quality checks")


checkpoints_app = typer.Typer(no_args_is_help=True, help="Checkpoints of unfinished runs.")
app.add_typer(checkpoints_app, name="checkpoints")


@checkpoints_app.command("list")
def checkpoints_list(all_: Annotated[bool, typer.Option("--all", help="Not only active ones.")] = False,
                     as_json: JsonOption = False) -> None:
    """List checkpoints (active ones by default)."""
    from tasks import status as q

    conn, settings = _conn()
    with conn:
        rows = q.checkpoints(conn, settings.schema_name, status=None if all_ else "active")
    if not _emit(rows, as_json):
        _print_rows(rows, ["id", "table", "status", "rows_staged", "staging_table", "updated_at", "expires_at"], "checkpoints")


@checkpoints_app.command("expire")
def checkpoints_expire(all_: Annotated[bool, typer.Option("--all", help="Expire every active checkpoint.")] = False) -> None:
    """Expire checkpoints past their expiry (or all active ones): the next run starts over."""
    from tasks.maintenance import expire_checkpoints

    conn, settings = _conn()
    with conn:
        n = expire_checkpoints(conn, settings.schema_name, all_active=all_)
    console.print(f"{n} checkpoint(s) expired")


@app.command()
def rollback(yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False) -> None:
    """Emergency stop: disable every table and expire active checkpoints (live data untouched)."""
    from tasks import status as q

    if not yes:
        typer.confirm("Disable every table and expire every active checkpoint?", abort=True)
    conn, settings = _conn()
    with conn:
        done = q.rollback(conn, settings.schema_name)
    console.print(f"{done['tables_disabled']} table(s) disabled, {done['checkpoints_expired']} checkpoint(s) expired;"
                  " re-enable with: bq-refresh tables enable --all (or NAME)")


shadow_app = typer.Typer(no_args_is_help=True, help="Shadow mode: publish beside the live table, compare, cut over.")
app.add_typer(shadow_app, name="shadow")


@shadow_app.command("compare")
def shadow_compare(name: TableName, as_json: JsonOption = False) -> None:
    """Differences between the shadow copy and the live table: the slices, then the rows (exit 1 when they differ)."""
    from tasks import shadow
    from tasks.registry import get_entry

    conn, settings = _conn()
    with conn:
        e = get_entry(conn, settings.schema_name, name)
        spec = e.spec()
        live = tuple(spec.target.split(".", 1)) if spec.target else (e.table_schema, e.table_name)
        key = [spec.target_name(k) for k in spec.key]
        window = spec.target_name(spec.window_column) if spec.window_column else None
        report = shadow.compare(conn, (live[0], live[1]), (settings.shadow_schema, live[1]), key, window=window)
    if not _emit(report, as_json):
        if "error" in report:
            raise RefreshError(report["error"], table=e.name)
        console.print(f"{report['live']} vs {report['shadow']}: {report['same']} same, {report['different']} different, "
                      f"{report['only_in_live']} only in live, {report['only_in_shadow']} only in shadow")
        for d in report["differing_slices"]:
            console.print(f"  {report['slicing']} {d['slice']}: {d['live_rows']} rows live, {d['shadow_rows']} in shadow")
        for ex in report["examples"]:
            console.print(f"  {ex['difference']}: {ex['key']}" + (f" ({', '.join(ex['columns'])})" if ex["columns"] else ""))
        for note in report["notes"]:
            console.print(f"  note: {note}")
    if not report.get("identical"):
        raise typer.Exit(1)


def _set_shadow(name: str, on: bool) -> str:
    from tasks.registry import update_table

    conn, settings = _conn()
    with conn:
        update_table(conn, settings.schema_name, name, params={"shadow": on})
    return str(settings.shadow_schema)


@shadow_app.command("cutover")
def shadow_cutover(name: TableName) -> None:
    """Switch the table to live: the next run reads everything and publishes into the live table."""
    _set_shadow(name, False)
    console.print(f"{name}: live (run it now to publish: bq-refresh run --table {name})")


@shadow_app.command("enable")
def shadow_enable(name: TableName) -> None:
    """Switch the table (back) to shadow mode: the rollback of a cutover. The live table is left as it is."""
    console.print(f"{name}: shadow mode (publishes into {_set_shadow(name, True)})")


@app.command()
def doctor(as_json: JsonOption = False) -> None:
    """Preflight checks, one line each: OK, or what to do (exit 1 when one fails): PostgreSQL (version, TLS, the
    role, the targets, staging, event triggers, timeouts, the pooler, disk) and BigQuery (the identity, and for
    every enabled table its source, columns and a read session)."""
    from blocks import resolve_resources
    from tasks import doctor as preflight
    from tasks.headroom import disk_report, registered_targets
    from tasks.preflight import session_check
    from tasks.registry import list_entries

    conn, settings = _conn()
    res = resolve_resources(settings)
    with conn:
        targets = registered_targets(conn, settings.schema_name)
        entries = [e for e in list_entries(conn, settings.schema_name) if e.is_enabled] if targets else []
        checks = [*preflight.postgres_checks(conn, staging_schema=settings.staging_schema, targets=targets,
                                             session_timeouts=settings.session_timeouts),
                  session_check(res.target), disk_report(conn, targets, settings.disk_budget_mb)]
    checks.append(preflight.identity(res))
    for entry in entries:
        checks += preflight.source_checks(res, entry)
    if not _emit({"checks": checks}, as_json):
        for check in checks:  # plain lines: never wrapped, whatever the terminal
            typer.echo(preflight.line(check))
    if any(check["status"] == "fail" for check in checks):
        raise typer.Exit(1)


@app.command()
def verify(
    table: Annotated[list[str] | None, typer.Option("--table", help="Table to verify (repeatable); none = every enabled"
                                                    " table.")] = None,
    select: SelectOption = None,
    exclude: ExcludeOption = None,
    rows: Annotated[bool, typer.Option("--rows", help="Bisect each differing slice down to the rows that differ"
                                       " and list them (key; missing, extra, or which columns differ).")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="Reload what differs through a normal run (up to"
                                         " REFRESH_REPAIR_MAX_ROWS differing rows by key; else, window mode, the"
                                         " differing periods whole, or a full refresh), then verify again.")] = False,
    max_bytes: Annotated[int | None, typer.Option("--max-bytes", min=0, help="Budget of one BigQuery query in bytes:"
                                                  " over BigQuery's dry-run estimate the table is not verified,"
                                                  " and the query carries it as maximumBytesBilled.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Compare each table with BigQuery slice by slice: a row count and a digest computed on each side, only the
    digests cross the wire (docs/operations.md "Verify"). Exit 1 when a slice differs or a table was not verified."""
    from blocks import resolve_resources
    from tasks.registry import get_entry, list_entries
    from tasks.verify import verify_table

    conn, settings = _conn()
    with conn:
        entries = ([get_entry(conn, settings.schema_name, t) for t in table] if table
                   else [e for e in list_entries(conn, settings.schema_name) if e.is_enabled])
        if select or exclude:  # dbt's selectors, as for run (enabled tables only)
            from tasks.registry import list_dependencies
            from tasks.selection import Candidate
            from tasks.selection import select as resolve

            pairs = [(d.parent, d.dependent) for d in list_dependencies(conn, settings.schema_name)]
            every = list_entries(conn, settings.schema_name)
            chosen = set(resolve([Candidate(e.name, frozenset(e.tags), e.is_enabled) for e in every], pairs,
                                 select or [], exclude or [], default_schema=settings.schema_name,
                                 enabled_only=True).tables)
            entries = [e for e in (entries if table else every) if e.name in chosen]
    res = resolve_resources(settings)
    # A repair re-reads the differing rows by key where verify can list them: bisected down to them first.
    verdicts = [verify_table(res, e, rows=rows or repair, max_bytes=max_bytes) for e in entries]
    if repair:
        from flows.refresh_table import refresh_table
        from tasks.verify import repair_table

        by_name = {e.name: e for e in entries}
        for i, v in enumerate(verdicts):
            if v.status == "differs":
                run = repair_table(res, by_name[v.table], v, refresh_table)
                verdicts[i] = verify_table(res, by_name[v.table], rows=rows, max_bytes=max_bytes)
                verdicts[i].repair = {k: run.get(k) for k in ("status", "repaired", "rows_inserted", "rows_updated",
                                                              "rows_deleted", "audit_id", "error")}
                verdicts[i].notes.insert(0, f"repaired ({run.get('status')}: {run.get('repaired')}), verified again")
    if not _emit({"tables": [v.as_dict() for v in verdicts]}, as_json):
        for v in verdicts:  # plain lines: never wrapped, whatever the terminal
            what = (f"{v.slices} slices by {v.slicing}, {v.source_rows} rows in BigQuery, {v.target_rows} here"
                    if v.status != "not_verified" else "")
            typer.echo(f"{v.status.upper():<13}{v.table}: {what}{'; ' if what and v.notes else ''}{'; '.join(v.notes)}")
            for d in v.differing[:20]:
                typer.echo(f"  slice {d['slice']}: {d['source_rows']} rows in BigQuery, {d['target_rows']} here"
                           f" (digest {d['source_digest']} vs {d['target_digest']})")
            if len(v.differing) > 20:
                typer.echo(f"  ... and {len(v.differing) - 20} more slices")
            for r in v.rows:
                key = ", ".join(f"{k}={val}" for k, val in r["key"].items())
                how = {"missing": "in BigQuery, not here", "extra": "here, not in BigQuery"}.get(
                    r["kind"], f"differs in {', '.join(r['columns'])}")
                typer.echo(f"  row {key}: {how}")
            if v.kept_deleted:
                typer.echo(f"  {len(v.kept_deleted)} key(s) here only, kept by the delete policy none (information)")
            if v.weaker:
                typer.echo(f"  compared by non-NULL counts only: {', '.join(v.weaker)}")
            if v.excluded:
                typer.echo(f"  not compared: {', '.join(v.excluded)}")
    if any(v.status != "equal" for v in verdicts):
        raise typer.Exit(EXIT_FAILED)


@app.command("role-sql")
def role_sql(role: Annotated[str, typer.Option(help="Name of the login role the refresh runs as.")] = "bq_refresh") -> None:
    """Print the least-privilege role script for the registered tables (run it as an administrator)."""
    from tasks.roles import least_privilege_sql

    conn, settings = _conn()
    with conn:
        typer.echo(least_privilege_sql(conn, settings.schema_name, settings.staging_schema, role), nl=False)


@app.command()
def serve(host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
          port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080) -> None:
    """Serve the HTTP API: status, runs, history, Prometheus metrics, config, trigger; /healthz for probes; its
    docs at /docs (offline). Stops on SIGTERM, with the temporary Prefect server it started for local runs."""
    import uvicorn

    from flows.api import create_app

    uvicorn.run(create_app(), host=host, port=port, log_level="info")


def _run_with_progress(start: Any) -> Any:
    """Run the flow in a thread while, on a terminal, a live table shows per table its phase (planning, reading,
    checking, publishing; then done, failed or skipped from its audit row), rows read of those expected, rows/s and
    the ETA of the read. Prefect's console logging keeps WARNING and above meanwhile, printed above the table
    (its INFO lines still reach the Prefect API and UI). Off a terminal the flow just runs."""
    if not console.is_terminal:
        return start()
    import threading
    import time

    from rich.live import Live
    from rich.table import Table

    from tasks import status as q
    from tasks.artifacts import format_duration, live_progress, progress_cells, wait_for_phase_change

    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["state"] = start()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    conn, settings = _conn()
    began = time.monotonic()
    columns = ("phase", "rows", "rows/s", "ETA", "time")
    finished_as = {"success": "done", "warning": "done (warning)"}
    with conn:
        latest = q.history(conn, settings.schema_name, limit=1)
        floor_id = latest[0]["id"] if latest else 0

        def render() -> Table:
            view = Table("table", title="bq-refresh run")
            for column, width in zip(columns, (10, 24, 8, 6, 6), strict=True):  # widths steady from frame to frame
                view.add_column(column, min_width=width, justify="left" if column == "phase" else "right")
            now = time.monotonic()
            rows: dict[str, list[str]] = {}
            try:
                for p in live_progress(since=began):
                    shown = progress_cells(p, now)
                    rows[p.table] = [shown[c] for c in columns]
                for h in reversed(q.history(conn, settings.schema_name, limit=100)):
                    if h["id"] <= floor_id or h["status"] == "running":
                        continue
                    name = f"{h['table_schema']}.{h['table_name']}"
                    read = f"{int(h['rows_processed'] or 0):,}"
                    seconds = (h["execution_time_ms"] or 0) / 1000
                    rows[name] = [finished_as.get(h["status"], h["status"]), read, "", "", format_duration(seconds)]
            except Exception:  # noqa: BLE001 - the display never breaks the run
                pass
            for name, cells in rows.items():
                view.add_row(name, *cells)
            return view

        worker = threading.Thread(target=target, daemon=True)
        with Live(render(), console=console, refresh_per_second=4, transient=True) as live, _prefect_logs_above():
            worker.start()
            while worker.is_alive():
                wait_for_phase_change(0.5)  # a new phase shows at once, rows every half second
                live.update(render(), refresh=True)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["state"]


@contextmanager
def _prefect_logs_above() -> Iterator[None]:
    """While a live display runs on ``console``: Prefect's console handlers print only WARNING and above, through
    ``console`` (above the display, not through it); stream handlers write to sys.stderr, which rich's Live
    redirects above the display too. Everything is put back afterwards."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    known = list(logging.Logger.manager.loggerDict.values())  # one copy: other threads may add loggers
    loggers = [logging.getLogger(), *(logger for logger in known if isinstance(logger, logging.Logger))]
    handlers = {h for logger in loggers for h in logger.handlers}
    undo: list[Any] = []
    for h in handlers:
        if isinstance(h, PrefectConsoleHandler):
            undo.append((h.setLevel, h.level))
            undo.append((partial(setattr, h, "console"), h.console))
            h.setLevel(max(h.level, logging.WARNING))
            h.console = console
        elif (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
              and h.stream in (sys.__stderr__, sys.__stdout__)):
            undo.append((h.setStream, h.stream))
            h.setStream(sys.stderr)
    try:
        yield
    finally:
        for put_back, value in reversed(undo):
            put_back(value)


@app.command()
def run(
    table: Annotated[list[str] | None, typer.Option("--table", help="Table to refresh (repeatable); none = all due.")] = None,
    select: SelectOption = None,
    exclude: ExcludeOption = None,
    full_refresh: Annotated[bool, typer.Option("--full-refresh", help="Re-read everything and replace.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Everything except publishing; report what would change.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Refresh enabled tables even if not due.")] = False,
    allow_deletes: Annotated[bool, typer.Option("--allow-deletes", help="Window mode: delete more vanished periods "
                                                "than max_vanished_periods in this run.")] = False,
    max_concurrency: Annotated[int, typer.Option(help="Tables refreshed at the same time.")] = 4,
    as_json: JsonOption = False,
) -> None:
    """Run the daily-refresh flow now with these parameters; exit 1 when a table failed."""
    from rich.table import Table

    from blocks import resolve_resources
    from tasks.preflight import require_session_state
    from tasks.registry import due_entries, list_entries

    # Before Prefect starts, what a run would only report after it: an unknown table, a transaction pooler (nothing
    # run), a BigQuery project or dataset that is not there. Each is one line and exit 2 (3 for a service down).
    settings = load_settings()
    res = resolve_resources(settings)
    tolerance = timedelta(minutes=settings.due_tolerance_minutes)
    selecting = bool(select or exclude)
    with res.target.connect(autocommit=True) as conn:
        registered = list_entries(conn, settings.schema_name)
        names, left_out = (_selection(conn, settings.schema_name, registered, table or [], select or [], exclude or [],
                                      force, tolerance) if selecting else (table or [], []))
        due = due_entries(conn, settings.schema_name, names=names or None, force=force, tolerance=tolerance)
    if selecting and not as_json:
        console.print(f"selected {len(names)} table(s): {', '.join(names) or '-'}"
                      + (f"; left out, disabled: {', '.join(left_out)}" if left_out else ""), markup=False)
    if selecting and not names:  # --exclude alone, nothing due but what it leaves out
        if not _emit({"tables": [], "failed": [], "selected": []}, as_json):
            console.print(_nothing_ran(registered, force))
        return
    require_session_state(res.target)
    _require_source_datasets(res.source, due)
    from flows.daily_refresh import daily_refresh, night_summary

    def start() -> Any:
        return daily_refresh(tables=names or None, full_refresh=full_refresh, dry_run=dry_run, force=force,
                             allow_deletes=allow_deletes, max_concurrency=max_concurrency, return_state=True)

    state: Any = start() if as_json else _run_with_progress(start)
    summary = night_summary(state)  # Completed, or Failed with the failed tables: the summary either way
    if selecting:
        summary = {**summary, "selected": names, "left_out_disabled": left_out}
    if not _emit(summary, as_json):
        out = Table("table", "status", "mode", "read", "inserted", "updated", "deleted", "ms", "note",
                    title="dry run: nothing published" if dry_run else None)
        for r in summary["tables"]:
            out.add_row(r["table"], r["status"], str(r.get("mode", "")), *(str(r.get(k, "")) for k in
                        ("rows_read", "rows_inserted", "rows_updated", "rows_deleted", "execution_time_ms")),
                        str(r.get("error") or r.get("reason") or "")[:80])
        console.print(out if summary["tables"] else _nothing_ran(registered, force))
        if dry_run:  # what the run would read and bill in BigQuery
            from tasks.sources import cost_line

            for r in summary["tables"]:
                if r.get("bigquery_bytes"):
                    console.print(f"{r['table']}: {cost_line(r['bigquery_bytes'])}", markup=False, soft_wrap=True)
    if summary["failed"]:
        failed = summary["failed"]
        err_console.print(f"error: {len(failed)} table(s) failed: {', '.join(failed)}"
                          " (bq-refresh history --status failed says why)", markup=False)
        raise typer.Exit(EXIT_FAILED)


def _selection(conn: Any, schema: str, registered: list[Any], table: list[str], select: list[str], exclude: list[str],
               force: bool, tolerance: timedelta) -> tuple[list[str], list[str]]:
    """The tables a run with --select or --exclude refreshes, in registry order, and the disabled tables its
    selectors matched but left out. --select and --table add up (neither minds whether a table is due); without
    either, the due tables; --exclude removes from both.

    Raises:
        SelectionError: a selector malformed or matching nothing; --exclude leaving nothing of a --select.
        ConfigError: a --table not registered.
    """
    from tasks.registry import due_entries, list_dependencies
    from tasks.selection import Candidate, Graph, SelectionError, choose
    from tasks.selection import select as resolve

    candidates = [Candidate(e.name, frozenset(e.tags), e.is_enabled) for e in registered]
    pairs = [(d.parent, d.dependent) for d in list_dependencies(conn, schema)]
    left_out: list[str] = []
    if select or table:
        chosen = {e.name for e in due_entries(conn, schema, names=table)} if table else set()  # registered?
        if select:
            picked = resolve(candidates, pairs, select, default_schema=schema, enabled_only=True)
            chosen |= set(picked.tables)
            left_out = picked.left_out_disabled
    else:
        chosen = {e.name for e in due_entries(conn, schema, force=force, tolerance=tolerance)}
    excluded = choose(exclude, candidates, Graph.of(pairs), option="--exclude", default_schema=schema)
    names = [c.name for c in candidates if c.name in chosen - excluded]
    if not names and (select or table):
        raise SelectionError(f"--exclude {' '.join(exclude)!r} leaves out every table chosen: nothing to run")
    return names, left_out


def _nothing_ran(registered: list[Any], force: bool) -> str:
    """Why a run refreshed nothing, and what to do."""
    if not registered:
        return "no table registered (bq-refresh tables add NAME --source ...)"
    if not any(e.is_enabled for e in registered):
        return (f"every table is disabled ({len(registered)}; bq-refresh rollback disables them all): "
                "bq-refresh tables enable --all (or NAME), or bq-refresh run --table NAME")
    return "nothing due" if force else "nothing due (use --force or --table)"


def _require_source_datasets(source: Any, entries: list[Any]) -> None:
    """Every BigQuery dataset the tables of a run read exists and answers, and the Storage Read API accepts a
    connection; within one budget, BIGQUERY_TIMEOUT_SECONDS, whose first error is said early (tasks/deadline.py).

    Raises:
        ConfigError: a dataset is not found or not readable (naming BIGQUERY_PROJECT_ID and BIGQUERY_DATASET when
            it is theirs), or the credentials are refused.
        SourceUnavailable: BigQuery did not answer within the budget.
    """
    from functools import partial

    import google.auth.exceptions
    from google.api_core import exceptions as gexc

    from tasks.deadline import Budget, call_within

    default = f"{source.project_id}.{source.dataset}"
    readers: dict[str, list[str]] = {}
    for e in entries:
        try:
            spec = e.spec()
        except ConfigError:
            continue  # the run fails that table naming its parameters; the others still run
        dataset = default if spec.source is None else source.table_ref(spec.source).rsplit(".", 1)[0]
        readers.setdefault(dataset, []).append(e.name)
    if not readers:
        return
    where = source.api_endpoint or "bigquery.googleapis.com"
    budget = Budget(source.timeout_s)
    limit = f"BIGQUERY_TIMEOUT_SECONDS={source.timeout_s:g}"

    def first_error(exc: BaseException) -> None:
        err_console.print(f"warning: BigQuery unreachable at {where} ({_one_line(exc)}); trying until {limit} s have"
                          " passed", markup=False)

    try:
        client = source.get_bigquery_client()
        for dataset, tables in sorted(readers.items()):
            names = ", ".join(tables)
            fix = (f"set BIGQUERY_PROJECT_ID ({source.project_id}) and BIGQUERY_DATASET ({source.dataset}) to where"
                   f" the sources are" if dataset == default else "fix the table's source (bq-refresh tables set"
                   """ NAME --params '{"source": "project.dataset.table"}')""")
            try:
                call_within(budget, partial(_get_dataset, client, dataset), on_first_error=first_error)
            except gexc.NotFound:
                raise ConfigError(f"BigQuery dataset {dataset} not found (read by {names}): {fix}") from None
            except gexc.Forbidden as exc:
                raise ConfigError(f"BigQuery refused access to dataset {dataset} (read by {names}): {exc.message};"
                                  " grant roles/bigquery.dataViewer on it, or " + fix) from None
    except (google.auth.exceptions.DefaultCredentialsError, google.auth.exceptions.RefreshError,
            gexc.Unauthorized) as exc:
        raise ConfigError(f"BigQuery refused the credentials ({_one_line(exc)}): set"
                          " GOOGLE_APPLICATION_CREDENTIALS_JSON to a service account key") from None
    except (gexc.GoogleAPICallError, gexc.RetryError, OSError) as exc:
        raise SourceUnavailable(f"BigQuery unreachable at {where} (no answer within {limit} s; last error:"
                                f" {_one_line(exc)}): check BIGQUERY_API_ENDPOINT and the network") from None
    _require_read_api(source, budget, limit)


def _get_dataset(client: Any, dataset: str, timeout: float) -> Any:
    return client.get_dataset(dataset, retry=None, timeout=timeout)


def _require_read_api(source: Any, budget: Any, limit: str) -> None:
    """The Storage Read API's endpoint accepts a connection (gRPC's handshake, before any call or credential)
    within what is left of the budget; a black hole is said once FIRST_ERROR_S would pass.

    Raises:
        SourceUnavailable: no connection within the budget.
    """
    import grpc

    from tasks.deadline import ATTEMPT_S

    where = source.storage_endpoint or "bigquerystorage.googleapis.com"
    channel = source.get_read_client().transport.grpc_channel
    ready = grpc.channel_ready_future(channel)
    try:
        try:
            ready.result(timeout=min(ATTEMPT_S, budget.remaining_s) if budget.reports_first_error
                         else budget.remaining_s)
        except grpc.FutureTimeoutError:
            if not budget.reports_first_error or budget.remaining_s <= 0:
                raise
            err_console.print(f"warning: BigQuery Storage Read API unreachable at {where} (no connection after"
                              f" {ATTEMPT_S:g} s); trying until {limit} s have passed", markup=False)
            ready.result(timeout=budget.remaining_s)
    except grpc.FutureTimeoutError:
        raise SourceUnavailable(f"BigQuery Storage Read API unreachable at {where} (no connection within {limit} s):"
                                " check BIGQUERY_STORAGE_ENDPOINT and the network") from None
    finally:
        ready.cancel()
        channel.close()


@app.command()
def maintenance(
    retention_days: Annotated[int | None, typer.Option(
        help="Archive audit rows older than this many days (default REFRESH_AUDIT_RETENTION_DAYS, 90).")] = None,
    log_retention_days: Annotated[int | None, typer.Option(
        help="Delete finished checkpoints, alert and view-refresh log rows older than this many days"
             " (default REFRESH_LOG_RETENTION_DAYS, 30).")] = None,
    discover: Annotated[bool, typer.Option("--discover/--no-discover", help="Register new BigQuery tables (disabled).")] = True,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Compare every enabled table with BigQuery slice"
                                         " by slice; record, alert (copy_differs) and, where auto_repair is on,"
                                         " repair what differs.")] = True,
    repair: Annotated[bool, typer.Option("--repair", help="Repair what verify finds in every table.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Expire checkpoints, delete old log rows, archive old audit rows, drop orphaned staging, discover tables,
    verify every enabled table."""
    from flows.maintenance import maintenance_flow

    report = maintenance_flow(retention_days=retention_days, discover=discover, log_retention_days=log_retention_days,
                              verify=verify, repair=repair)
    if not _emit(report, as_json):
        console.print(report)


automations_app = typer.Typer(no_args_is_help=True, help="Prefect automations for failure notifications.")
app.add_typer(automations_app, name="automations")


@automations_app.command("apply")
def automations_apply(
    block: Annotated[str, typer.Option(help="Saved notification block, e.g. custom-webhook/bq-refresh-alerts.")],
) -> None:
    """Create (or replace) the automation that notifies when a flow run fails or crashes."""
    from flows.automations import AUTOMATION_NAME, apply_failure_automation

    automation_id = apply_failure_automation(block)
    console.print(f"automation [bold]{AUTOMATION_NAME}[/] saved ({automation_id})")


@app.command()
def demo(
    asins: Annotated[int, typer.Option(help="ASINs in the generated SQP data.")] = 50,
    queries: Annotated[int, typer.Option(help="Search queries per ASIN.")] = 500,
    weeks: Annotated[int, typer.Option(help="Weeks of data (rows = asins x queries x weeks).")] = 12,
    keep_up: Annotated[bool, typer.Option("--keep-up", help="Leave the emulator and PostgreSQL running.")] = False,
    reset: Annotated[bool, typer.Option("--reset/--reuse", help="Start from an empty source and target.")] = True,
    stop: Annotated[bool, typer.Option("--stop", help="Only stop what a demo left running in the state folder (the "
                                       "emulator, the embedded PostgreSQL) and say what was stopped.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Nightly refresh of generated SQP data from the local BigQuery emulator into the embedded PostgreSQL,
    then a simulated next day (new week, restated week, deleted row, new column) and the second night.
    With --keep-up, every other command finds the demo's emulator and database by itself until demo --stop."""
    from bq_refresh.services import stop_embedded_postgres, stop_emulator

    settings = load_settings()
    state = settings.state_dir
    if stop:
        typer.echo(_stop_demo_services(state))
        return
    from flows.daily_refresh import daily_refresh
    from flows.demo import create_summaries, prepare_demo, simulate_next_day

    nights: list[dict[str, Any]] = []
    try:
        with console.status("starting the BigQuery emulator and PostgreSQL, generating SQP data"):
            info = prepare_demo(state, asins, queries, weeks, reset)
        console.print(f"source: {info['rows']:,} SQP rows ({asins} ASINs x {queries} queries x {weeks} weeks) "
                      f"in the BigQuery emulator at {info['emulator']}")
        first = _demo_night(daily_refresh, "night 1: everything is new", as_json)
        create_summaries(settings.schema_name)
        with console.status("simulating the next day in BigQuery"):
            change = simulate_next_day(asins, queries, weeks)
        if not as_json:
            console.print(f"next day in the source: a new week ({change['new_week_rows']:,} rows), the last week "
                          "restated (values changed, one row gone), a daily row deleted, a new column 'brand'")
        second = _demo_night(daily_refresh, "night 2: incremental, restated window, reconciliation, drift", as_json)
        nights = [first, second]
        if as_json:
            typer.echo(json.dumps({"source_rows": info["rows"], "next_day": change, "nights": nights}, default=str))
        else:
            import os

            prefect_home = os.environ.get("PREFECT_HOME", str(state / "prefect"))
            steps = ("\nnext steps (from any folder, while they run):\n  bq-refresh status        # health per table"
                     "\n  bq-refresh history --limit 10\n  bq-refresh run --force   # another night"
                     "\n  bq-refresh serve         # the API: /health /status /metrics on :8080"
                     f"\n  PREFECT_HOME={prefect_home} prefect server start   # the Prefect UI on these runs"
                     "\n  bq-refresh demo --stop   # stop the emulator and PostgreSQL")
            console.print(steps if keep_up else "\nrerun with --keep-up to leave the emulator and PostgreSQL running;"
                          " then bq-refresh status, history, run and serve use them from any folder",
                          markup=False, highlight=False)
    finally:
        if not keep_up:
            stop_emulator(state)
            stop_embedded_postgres(state)
    if any(n["failed"] for n in nights):
        raise typer.Exit(1)


def _stop_demo_services(state: Path) -> str:
    """Stop the emulator and the embedded PostgreSQL running in the state folder; say what was stopped."""
    from bq_refresh.services import (
        embedded_postgres_pid,
        running_emulator,
        stop_embedded_postgres,
        stop_emulator,
    )

    emulator, postgres = running_emulator(state), embedded_postgres_pid(state)
    stopped = []
    if stop_emulator(state):
        stopped.append("the BigQuery emulator" + (f" (pid {emulator.pid}, {emulator.rest_url})" if emulator else ""))
    if stop_embedded_postgres(state):
        stopped.append(f"the embedded PostgreSQL (pid {postgres}, {state / 'pgdata'})")
    return f"stopped {' and '.join(stopped)}" if stopped else f"nothing running in {state}"


def _demo_night(daily_refresh: Any, title: str, as_json: bool) -> dict[str, Any]:
    from rich.table import Table

    from flows.daily_refresh import night_summary

    def start() -> Any:
        return daily_refresh(force=True, return_state=True)

    state = start() if as_json else _run_with_progress(start)
    summary = night_summary(state)  # Completed, or Failed with the failed tables: the summary either way
    from tasks.status import checks_passed

    conn, settings = _conn()
    with conn:
        passed = checks_passed(conn, settings.schema_name, [r["audit_id"] for r in summary["tables"] if r.get("audit_id")])
    for r in summary["tables"]:
        done, run = passed.get(r.get("audit_id") or -1, (0, 0))
        r["checks"] = f"{done}/{run}"
    if not as_json:
        out = Table("table", "status", "mode", "read", "inserted", "updated", "deleted", "ms", "checks passed", title=title)
        for r in summary["tables"]:
            out.add_row(r["table"], r["status"], str(r.get("mode", "")), *(f"{r.get(k, 0):,}" for k in
                        ("rows_read", "rows_inserted", "rows_updated", "rows_deleted", "execution_time_ms")), r["checks"])
        console.print(out)
        refreshed = [v["view"] for v in summary.get("views", []) if v["refreshed"]]
        if refreshed:
            console.print(f"materialized views refreshed in order: {', '.join(refreshed)}")
        for r in summary["tables"]:
            if r.get("drift"):
                console.print(f"schema drift on {r['table']}: {r['drift']}")
    return summary


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line (libraries put hints on further lines)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


def _without_password(text: str) -> str:
    """``text`` with the database URL's password (if any) masked: messages may echo the connection string."""
    try:
        from urllib.parse import urlsplit

        url = load_settings().database_url
        password = urlsplit(url.get_secret_value()).password if url is not None else None
    except Exception:  # noqa: BLE001 - an unreadable setting has no password to hide
        password = None
    return text.replace(password, "***") if password else text


def _registry_schema() -> str | None:
    try:
        return load_settings().schema_name
    except Exception:  # noqa: BLE001 - the settings are what failed
        return None


def explain(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line that say why a command stopped, naming what the user must change.

    0 all good; 1 a table failed or a check found a difference; 2 usage or configuration; 3 a service unreachable.
    """
    import psycopg
    import pydantic

    if isinstance(exc, ConfigError | DependencyCycle):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, SourceUnavailable | TargetUnavailable):
        return EXIT_UNAVAILABLE, str(exc)
    if isinstance(exc, RefreshError):
        return EXIT_FAILED, str(exc)
    if isinstance(exc, pydantic.ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or exc.title
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return EXIT_USAGE, f"invalid setting {where}: {first['msg']}{more}"
    if isinstance(exc, psycopg.errors.UndefinedTable):
        schema = _registry_schema()
        if schema and (f'"{schema}.' in str(exc) or f'"{schema}".' in str(exc)):
            missing = exc.diag.message_primary or _one_line(exc)
            return EXIT_USAGE, (f"schema {schema} is not initialised ({missing}): run bq-refresh init"
                                " (or set BQ_REFRESH_SCHEMA to the schema it was run for)")
        return EXIT_FAILED, f"PostgreSQL: {_one_line(exc)}"
    if isinstance(exc, psycopg.errors.UndefinedColumn):  # a schema of an earlier version: a migration not applied
        from tasks.migrations import system_tables

        primary = exc.diag.message_primary or _one_line(exc)
        if any(f'relation "{name}"' in primary for name in system_tables()):
            return EXIT_USAGE, (f"schema {_registry_schema()} is not up to date ({primary}): run bq-refresh init")
        return EXIT_FAILED, f"PostgreSQL: {_one_line(exc)}"
    if isinstance(exc, psycopg.OperationalError):
        text = _without_password(_one_line(exc))
        refused_login = ("authentication failed", "no pg_hba.conf entry", "does not exist", "password", "SSL")
        if any(marker in text for marker in refused_login):
            return EXIT_USAGE, f"PostgreSQL refused the connection ({text}): check BQ_REFRESH_DATABASE_URL"
        return EXIT_UNAVAILABLE, (f"cannot reach PostgreSQL ({text}): check BQ_REFRESH_DATABASE_URL and that the"
                                  " server is running")
    if isinstance(exc, psycopg.Error):
        return EXIT_FAILED, f"PostgreSQL: {_without_password(_one_line(exc))}"
    if isinstance(exc, ConnectionError | TimeoutError):
        return EXIT_UNAVAILABLE, f"{type(exc).__name__}: {_one_line(exc)}"
    return EXIT_FAILED, f"{type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)"


def main() -> None:
    """Console entry point: click's usage errors (exit 2), else one line naming what to change (--debug for the
    traceback) and an exit code a script can use (see ``explain``)."""
    try:
        code = app(standalone_mode=False)  # click returns the code of typer.Exit here instead of raising
    except typer.TyperException as exc:  # click's own: a usage error, "Try '... --help'", one Error line
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help is printed already: asking for it is no error
            sys.exit(EXIT_OK)
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            err_console.print(f"Error: {exc.format_message()}", markup=False)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted", markup=False)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence prints one line, not a traceback
        if DEBUG["on"]:
            raise
        code, message = explain(exc)
        err_console.print(f"error: {message}", markup=False)
        sys.exit(code)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
