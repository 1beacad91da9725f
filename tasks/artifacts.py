"""Prefect artifacts: a table per run, progress of long loads, a markdown summary. Best effort."""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

log = logging.getLogger(__name__)
ARTIFACT_COLUMNS = ["table", "status", "mode", "rows_read", "rows_inserted", "rows_updated", "rows_deleted",
                    "execution_time_ms", "checks", "views_failed"]


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def publish_table_artifact(rows: list[dict[str, Any]], *, key: str | None, title: str) -> None:
    """A table artifact with one row per refreshed table."""
    if not _in_run():
        return
    try:
        from prefect.artifacts import create_table_artifact

        cells = {"views_failed": lambda r: _cell(r.get("views_failed")), "checks": _checks}
        table = [{c: cells[c](r) if c in cells else r.get(c) for c in ARTIFACT_COLUMNS} for r in rows]
        create_table_artifact(table=table, key=key, description=title)
    except Exception as exc:  # noqa: BLE001 - artifacts never fail a refresh
        log.warning("table artifact not created: %s", exc)


def _checks(run: dict[str, Any]) -> str | None:
    """A run's quality checks as one cell: "5/6 passed; warned: null_fraction" (the soft checks that failed)."""
    warned = run.get("checks_warned") or []
    parts = [f"{run['checks_passed']}/{run['checks_run']} passed"] if run.get("checks_run") else []
    if warned:
        parts.append(f"warned: {', '.join(map(str, warned))}")
    return "; ".join(parts) or None


def _cell(views_failed: Any) -> str | None:
    """A run's failed dependent views as one cell: "view: error; ..."."""
    if not views_failed:
        return None
    return "; ".join(f"{v['view']}: {v.get('error') or 'not queryable'}" for v in views_failed)


def publish_markdown(markdown: str, *, key: str | None, title: str) -> None:
    if not _in_run():
        return
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=markdown, key=key, description=title)
    except Exception as exc:  # noqa: BLE001
        log.warning("markdown artifact not created: %s", exc)


class Progress:
    """A progress artifact for a long load, updated at most every ``every`` rows."""

    def __init__(self, table: str, expected_rows: int, every: int = 100_000) -> None:
        self.expected = max(expected_rows, 1)
        self.every = every
        self.last = 0
        self.id: UUID | None = None
        if _in_run() and expected_rows >= every:
            try:
                from prefect.artifacts import create_progress_artifact

                created = create_progress_artifact(progress=0.0, description=f"rows staged for {table}")
                self.id = created if isinstance(created, UUID) else None
            except Exception as exc:  # noqa: BLE001
                log.warning("progress artifact not created: %s", exc)

    def update(self, rows: int) -> None:
        if self.id is None or rows - self.last < self.every:
            return
        self.last = rows
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(artifact_id=self.id, progress=min(100.0, 100.0 * rows / self.expected))
        except Exception as exc:  # noqa: BLE001
            log.warning("progress artifact not updated: %s", exc)
