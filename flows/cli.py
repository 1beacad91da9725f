"""The bq-refresh command line."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

from bq_refresh.offline import configure_offline_prefect

configure_offline_prefect()

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from bq_refresh.errors import RefreshError  # noqa: E402
from bq_refresh.settings import load_settings  # noqa: E402

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Keep PostgreSQL tables in sync with BigQuery.")
console = Console()
err_console = Console(stderr=True)
DEBUG = {"on": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    DEBUG["on"] = debug


def _emit(data: Any, as_json: bool) -> bool:
    if as_json:
        typer.echo(json.dumps(data, default=str, indent=2))
    return as_json


@app.command()
def init(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Create or upgrade the refresh system's schema (idempotent)."""
    from blocks import resolve_resources
    from tasks.migrations import apply_migrations

    settings = load_settings()
    res = resolve_resources(settings)
    with res.target.connect(autocommit=True) as conn:
        report = apply_migrations(conn, settings.schema_name)
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
    from blocks import resolve_resources
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
    settings = load_settings()
    res = resolve_resources(settings)
    with res.target.connect(autocommit=True) as conn:
        entry = register_table(conn, settings.schema_name, name, spec, priority=priority,
                               frequency_hours=frequency_hours, enabled=not disabled)
    if not _emit({"id": entry.id, "table": entry.name, "params": entry.params}, as_json):
        console.print(f"registered [bold]{entry.name}[/] (id {entry.id})")


@tables_app.command("list")
def tables_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List registered tables."""
    from rich.table import Table

    from blocks import resolve_resources
    from tasks.registry import list_entries

    settings = load_settings()
    res = resolve_resources(settings)
    with res.target.connect(autocommit=True) as conn:
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


@app.command()
def run(
    table: Annotated[list[str] | None, typer.Option("--table", help="Table to refresh (repeatable); none = all due.")] = None,
    full_refresh: Annotated[bool, typer.Option("--full-refresh", help="Re-read everything and replace.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Everything except publishing; report what would change.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Refresh enabled tables even if not due.")] = False,
    max_concurrency: Annotated[int, typer.Option(help="Tables refreshed at the same time.")] = 4,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Run the daily-refresh flow now with these parameters; exit 1 when a table failed."""
    from rich.table import Table

    from flows.daily_refresh import daily_refresh

    state: Any = daily_refresh(tables=table or None, full_refresh=full_refresh, dry_run=dry_run, force=force,
                               max_concurrency=max_concurrency, return_state=True)
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
    retention_days: Annotated[int, typer.Option(help="Keep audit rows this many days.")] = 90,
    discover: Annotated[bool, typer.Option("--discover/--no-discover", help="Register new BigQuery tables (disabled).")] = True,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Expire checkpoints, purge old audit rows, drop orphaned staging, discover new tables."""
    from flows.maintenance import maintenance_flow

    report = maintenance_flow(retention_days=retention_days, discover=discover)
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
    queries: Annotated[int, typer.Option(help="Search queries per ASIN.")] = 50,
    weeks: Annotated[int, typer.Option(help="Weeks of data.")] = 4,
    keep_up: Annotated[bool, typer.Option("--keep-up", help="Leave the emulator and PostgreSQL running.")] = False,
    reset: Annotated[bool, typer.Option("--reset/--reuse", help="Start from empty source and target.")] = True,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Refresh generated SQP data from the local BigQuery emulator into the embedded PostgreSQL."""
    from bq_refresh.services import stop_embedded_postgres, stop_emulator
    from flows.demo import prepare_demo
    from flows.refresh_table import refresh_table

    settings = load_settings()
    state = settings.state_dir
    try:
        with console.status("starting the BigQuery emulator and PostgreSQL, generating SQP data"):
            info = prepare_demo(state, asins, queries, weeks, reset)
        console.print(f"source: {info['rows']} SQP rows in the emulator ({info['emulator']})")
        first = refresh_table("asin_performance_data")
        second = refresh_table("asin_performance_data")
        if not _emit({"first": first, "second": second}, as_json):
            for label, r in (("first run", first), ("rerun", second)):
                console.print(f"{label}: {r['status']}, read {r['rows_read']}, inserted {r['rows_inserted']}, "
                              f"updated {r['rows_updated']}, deleted {r['rows_deleted']}")
            console.print("next: bq-refresh tables list")
    finally:
        if not keep_up:
            stop_emulator(state)
            stop_embedded_postgres(state)


def main() -> None:
    """Console entry point: one clear line on error (--debug for the traceback)."""
    try:
        app(standalone_mode=False)
    except RefreshError as exc:
        if DEBUG["on"]:
            raise
        err_console.print(f"[red]error:[/] {exc}")
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
