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
