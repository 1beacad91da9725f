"""The bq-refresh command line."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Annotated, Any

from bq_refresh.offline import configure_offline_prefect

configure_offline_prefect()

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from bq_refresh.errors import RefreshError  # noqa: E402
from bq_refresh.settings import load_settings  # noqa: E402

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Keep PostgreSQL tables in sync with BigQuery.")
console = Console(width=None if sys.stdout.isatty() else 150)  # full-width tables in logs and CI too
err_console = Console(stderr=True)
DEBUG = {"on": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
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
def init(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
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
    mode: Annotated[str, typer.Option(help="incremental, window or full.")] = "incremental",
    window_column: Annotated[str | None, typer.Option(help="Period column (window mode).")] = None,
    lookback: Annotated[str, typer.Option(help="Re-read window behind the watermark, e.g. 7d.")] = "0",
    params: Annotated[str | None, typer.Option(help="More sync parameters as a JSON object.")] = None,
    priority: Annotated[int, typer.Option()] = 100,
    frequency_hours: Annotated[int, typer.Option()] = 24,
    disabled: Annotated[bool, typer.Option("--disabled")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Register (or update) a table; its sync parameters are validated first."""
    from tasks.registry import register_table

    spec: dict[str, Any] = json.loads(params) if params else {}
    for k, v in {"source": source, "query": query, "cursor": cursor, "window_column": window_column}.items():
        if v is not None:
            spec[k] = v
    if key:
        spec["key"] = [k.strip() for k in key.split(",") if k.strip()]
    spec.setdefault("mode", mode)
    if lookback != "0":
        spec["lookback"] = lookback
    conn, settings = _conn()
    with conn:
        entry = register_table(conn, settings.schema_name, name, spec, priority=priority,
                               frequency_hours=frequency_hours, enabled=not disabled)
    if not _emit({"id": entry.id, "table": entry.name, "params": entry.params}, as_json):
        console.print(f"registered [bold]{entry.name}[/] (id {entry.id})")


@tables_app.command("list")
def tables_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List registered tables."""
    from rich.table import Table

    from tasks.registry import list_entries

    conn, settings = _conn()
    with conn:
        entries = list_entries(conn, settings.schema_name)
    rows = [{"table": e.name, "enabled": e.is_enabled, "priority": e.priority, "frequency_hours": e.refresh_frequency_hours,
             "last_refresh_at": e.last_refresh_at, "next_refresh_at": e.next_refresh_at, "watermark": e.watermark,
             "mode": e.params.get("mode")} for e in entries]
    if _emit(rows, as_json):
        return
    table = Table("table", "enabled", "priority", "mode", "last refresh", "next due", "watermark")
    for r in rows:
        table.add_row(str(r["table"]), str(r["enabled"]), str(r["priority"]), str(r["mode"]), str(r["last_refresh_at"] or "-"),
                      str(r["next_refresh_at"] or "-"), str(r["watermark"] or "-"))
    console.print(table)


def _print_rows(rows: list[dict[str, Any]], columns: list[str], title: str | None = None) -> None:
    from rich.table import Table

    table = Table(*columns, title=title)
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in columns))
    console.print(table if rows else f"({title or 'nothing'}: no rows)")


@tables_app.command("show")
def tables_show(name: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show one table's registry row and sync parameters."""
    from tasks.registry import get_entry, list_dependencies

    conn, settings = _conn()
    with conn:
        e = get_entry(conn, settings.schema_name, name)
        deps = [d.__dict__ for d in list_dependencies(conn, settings.schema_name) if e.name in (d.parent, d.dependent)]
    data = {"table": e.name, "enabled": e.is_enabled, "priority": e.priority, "frequency_hours": e.refresh_frequency_hours,
            "last_refresh_at": e.last_refresh_at, "next_refresh_at": e.next_refresh_at, "watermark": e.watermark,
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
def tables_enable(name: str) -> None:
    """Enable a table."""
    _set_enabled(name, True)


@tables_app.command("disable")
def tables_disable(name: str) -> None:
    """Disable a table (it is no longer refreshed)."""
    _set_enabled(name, False)


@tables_app.command("remove")
def tables_remove(name: str) -> None:
    """Unregister a table (the live table and its audit rows stay)."""
    from tasks.registry import remove_table

    conn, settings = _conn()
    with conn:
        remove_table(conn, settings.schema_name, name)
    console.print(f"{name} removed from the registry")


@tables_app.command("set")
def tables_set(
    name: str,
    priority: Annotated[int | None, typer.Option()] = None,
    frequency_hours: Annotated[int | None, typer.Option()] = None,
    params: Annotated[str | None, typer.Option(help="Sync parameters to merge, as a JSON object.")] = None,
    depends_on: Annotated[list[str] | None, typer.Option(help="Parent table (repeatable): hard dependency.")] = None,
    soft_depends_on: Annotated[list[str] | None, typer.Option(help="Parent table (repeatable): soft dependency.")] = None,
) -> None:
    """Change priority, frequency, sync parameters or dependencies of a table."""
    from tasks.registry import add_dependency, update_table

    conn, settings = _conn()
    with conn:
        e = update_table(conn, settings.schema_name, name, priority=priority, frequency_hours=frequency_hours,
                         params=json.loads(params) if params else None)
        for parent in depends_on or []:
            add_dependency(conn, settings.schema_name, parent, e.name, "hard")
        for parent in soft_depends_on or []:
            add_dependency(conn, settings.schema_name, parent, e.name, "soft")
    console.print(f"{e.name} updated")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
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
    table: Annotated[str | None, typer.Option()] = None,
    status_: Annotated[str | None, typer.Option("--status")] = None,
    since: Annotated[datetime | None, typer.Option()] = None,
    limit: Annotated[int, typer.Option()] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Audit rows, newest first."""
    from tasks import status as q

    conn, settings = _conn()
    with conn:
        rows = q.history(conn, settings.schema_name, table=table, status=status_, since=since, limit=limit)
    if not _emit(rows, as_json):
        _print_rows(rows, ["id", "table_name", "status", "refresh_started_at", "rows_processed", "rows_inserted",
                           "rows_updated", "rows_deleted", "execution_time_ms", "error_message"], "history")


@app.command()
def quality(table: Annotated[str | None, typer.Option()] = None,
            as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
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
                     as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
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
                  " re-enable with: bq-refresh tables enable NAME")


shadow_app = typer.Typer(no_args_is_help=True, help="Shadow mode: publish beside the live table, compare, cut over.")
app.add_typer(shadow_app, name="shadow")


@shadow_app.command("compare")
def shadow_compare(name: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Differences between the shadow copy and the live table, by key (exit 1 when they differ)."""
    from tasks import shadow
    from tasks.registry import get_entry

    conn, settings = _conn()
    with conn:
        e = get_entry(conn, settings.schema_name, name)
        spec = e.spec()
        live = tuple(spec.target.split(".", 1)) if spec.target else (e.table_schema, e.table_name)
        key = [spec.target_name(k) for k in spec.key]
        report = shadow.compare(conn, (live[0], live[1]), (settings.shadow_schema, live[1]), key)
    if not _emit(report, as_json):
        if "error" in report:
            raise RefreshError(report["error"], table=e.name)
        console.print(f"{report['live']} vs {report['shadow']}: {report['same']} same, {report['different']} different, "
                      f"{report['only_in_live']} only in live, {report['only_in_shadow']} only in shadow")
        for ex in report["examples"]:
            console.print(f"  {ex['difference']}: {ex['key']}")
    if not report.get("identical"):
        raise typer.Exit(1)


def _set_shadow(name: str, on: bool) -> str:
    from tasks.registry import update_table

    conn, settings = _conn()
    with conn:
        update_table(conn, settings.schema_name, name, params={"shadow": on})
    return str(settings.shadow_schema)


@shadow_app.command("cutover")
def shadow_cutover(name: str) -> None:
    """Switch the table to live: the next run reads everything and publishes into the live table."""
    _set_shadow(name, False)
    console.print(f"{name}: live (run it now to publish: bq-refresh run --table {name})")


@shadow_app.command("enable")
def shadow_enable(name: str) -> None:
    """Switch the table (back) to shadow mode: the rollback of a cutover. The live table is left as it is."""
    console.print(f"{name}: shadow mode (publishes into {_set_shadow(name, True)})")


@app.command()
def doctor(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Preflight checks, one line each: OK, or what to do (exit 1 when one fails)."""
    from tasks.headroom import disk_report, registered_targets

    conn, settings = _conn()
    with conn:
        checks = [disk_report(conn, registered_targets(conn, settings.schema_name), settings.disk_budget_mb)]
    if not _emit({"checks": checks}, as_json):
        for check in checks:  # plain lines: never wrapped, whatever the terminal
            typer.echo(f"{check['status'].upper():<8}{check['name']}: {check['message']}")
    if any(check["status"] == "fail" for check in checks):
        raise typer.Exit(1)


@app.command("role-sql")
def role_sql(role: Annotated[str, typer.Option(help="Name of the login role the refresh runs as.")] = "bq_refresh") -> None:
    """Print the least-privilege role script for the registered tables (run it as an administrator)."""
    from tasks.roles import least_privilege_sql

    settings = load_settings()
    with _conn() as conn:
        typer.echo(least_privilege_sql(conn, settings.schema_name, settings.staging_schema, role), nl=False)


@app.command()
def serve(host: Annotated[str, typer.Option()] = "127.0.0.1", port: Annotated[int, typer.Option()] = 8080) -> None:
    """Serve the HTTP API (health, status, history, metrics, config, trigger)."""
    import uvicorn

    from flows.api import create_app

    uvicorn.run(create_app(), host=host, port=port, log_level="info")


def _run_with_progress(start: Any) -> Any:
    """Run the flow in a thread while a live table shows, per table, rows staged and rows/s."""
    import threading
    import time

    from rich.live import Live
    from rich.table import Table

    from tasks import status as q

    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["state"] = start()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    conn, settings = _conn()
    first_seen: dict[str, float] = {}
    with conn:
        latest = q.history(conn, settings.schema_name, limit=1)
        floor_id = latest[0]["id"] if latest else 0

        def render() -> Table:
            view = Table("table", "state", "rows", "rows/s", title="bq-refresh run")
            try:
                for c in q.checkpoints(conn, settings.schema_name, status="active"):
                    seen = first_seen.setdefault(c["table"], time.monotonic())
                    rows = int(c["rows_staged"] or 0)
                    view.add_row(c["table"], "loading", f"{rows:,}", f"{rows / max(time.monotonic() - seen, 0.1):,.0f}")
                for h in reversed(q.history(conn, settings.schema_name, limit=100)):
                    if h["id"] <= floor_id or h["status"] == "running":
                        continue
                    done = int(h["rows_processed"] or 0)
                    rate = done / max((h["execution_time_ms"] or 0) / 1000, 0.001)
                    view.add_row(f"{h['table_schema']}.{h['table_name']}", h["status"], f"{done:,}", f"{rate:,.0f}")
            except Exception:  # noqa: BLE001 - the display never breaks the run
                pass
            return view

        worker = threading.Thread(target=target, daemon=True)
        worker.start()
        with Live(render(), console=console, refresh_per_second=2, transient=True) as live:
            while worker.is_alive():
                worker.join(0.5)
                live.update(render())
    if "error" in outcome:
        raise outcome["error"]
    return outcome["state"]


@app.command()
def run(
    table: Annotated[list[str] | None, typer.Option("--table", help="Table to refresh (repeatable); none = all due.")] = None,
    full_refresh: Annotated[bool, typer.Option("--full-refresh", help="Re-read everything and replace.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Everything except publishing; report what would change.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Refresh enabled tables even if not due.")] = False,
    allow_deletes: Annotated[bool, typer.Option("--allow-deletes", help="Window mode: delete more vanished periods "
                                                "than max_vanished_periods in this run.")] = False,
    max_concurrency: Annotated[int, typer.Option(help="Tables refreshed at the same time.")] = 4,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run the daily-refresh flow now with these parameters; exit 1 when a table failed."""
    from rich.table import Table

    from blocks import resolve_resources
    from flows.daily_refresh import daily_refresh
    from tasks.preflight import require_session_state

    require_session_state(resolve_resources(load_settings()).target)  # a transaction pooler: one line, nothing run

    def start() -> Any:
        return daily_refresh(tables=table or None, full_refresh=full_refresh, dry_run=dry_run, force=force,
                             allow_deletes=allow_deletes, max_concurrency=max_concurrency, return_state=True)

    state: Any = start() if as_json else _run_with_progress(start)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, dict):
        raise summary if isinstance(summary, BaseException) else RefreshError(str(state.message))
    if not _emit(summary, as_json):
        out = Table("table", "status", "mode", "read", "inserted", "updated", "deleted", "ms", "note",
                    title="dry run: nothing published" if dry_run else None)
        for r in summary["tables"]:
            out.add_row(r["table"], r["status"], str(r.get("mode", "")), *(str(r.get(k, "")) for k in
                        ("rows_read", "rows_inserted", "rows_updated", "rows_deleted", "execution_time_ms")),
                        str(r.get("error") or r.get("reason") or "")[:80])
        console.print(out if summary["tables"] else "nothing due (use --force or --table)")
    if summary["failed"]:
        raise typer.Exit(1)


@app.command()
def maintenance(
    retention_days: Annotated[int | None, typer.Option(
        help="Archive audit rows older than this many days (default REFRESH_AUDIT_RETENTION_DAYS, 90).")] = None,
    log_retention_days: Annotated[int | None, typer.Option(
        help="Delete finished checkpoints, alert and view-refresh log rows older than this many days"
             " (default REFRESH_LOG_RETENTION_DAYS, 30).")] = None,
    discover: Annotated[bool, typer.Option("--discover/--no-discover", help="Register new BigQuery tables (disabled).")] = True,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Expire checkpoints, delete old log rows, archive old audit rows, drop orphaned staging, discover tables."""
    from flows.maintenance import maintenance_flow

    report = maintenance_flow(retention_days=retention_days, discover=discover, log_retention_days=log_retention_days)
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
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Nightly refresh of generated SQP data from the local BigQuery emulator into the embedded PostgreSQL,
    then a simulated next day (new week, restated week, deleted row, new column) and the second night."""
    from bq_refresh.services import stop_embedded_postgres, stop_emulator
    from flows.daily_refresh import daily_refresh
    from flows.demo import create_summaries, prepare_demo, simulate_next_day

    settings = load_settings()
    state = settings.state_dir
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
            console.print("\nnext steps:\n  .venv/bin/bq-refresh status        # health per table"
                          "\n  .venv/bin/bq-refresh history --limit 10"
                          "\n  .venv/bin/bq-refresh serve         # the API: /health /status /metrics on :8080"
                          "\n  .venv/bin/prefect server start     # the Prefect UI on this data (PREFECT_HOME=.state/prefect)"
                          "\n  rerun with --keep-up to leave the emulator and PostgreSQL running")
    finally:
        if not keep_up:
            stop_emulator(state)
            stop_embedded_postgres(state)
    if any(n["failed"] for n in nights):
        raise typer.Exit(1)


def _demo_night(daily_refresh: Any, title: str, as_json: bool) -> dict[str, Any]:
    from rich.table import Table

    def start() -> Any:
        return daily_refresh(force=True, return_state=True)

    state = start() if as_json else _run_with_progress(start)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, dict):
        raise summary if isinstance(summary, BaseException) else RefreshError(str(state.message))
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


def main() -> None:
    """Console entry point: one clear line on error (--debug for the traceback)."""
    try:
        code = app(standalone_mode=False)  # click returns the code of typer.Exit here instead of raising
        if isinstance(code, int) and code:
            sys.exit(code)
    except RefreshError as exc:
        if DEBUG["on"]:
            raise
        err_console.print(f"[red]error:[/] {exc}", soft_wrap=True)  # one error, one line (no wrap at 80 columns)
        sys.exit(1)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence prints one line, not a traceback
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if DEBUG["on"]:
            raise
        err_console.print(f"[red]error:[/] {type(exc).__name__}: {exc}\n[dim]hint: rerun with --debug for the traceback[/]")
        sys.exit(1)


if __name__ == "__main__":
    main()
