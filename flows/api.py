"""The HTTP API: health, status, history, metrics, config and trigger (FastAPI, with its OpenAPI document)."""

from __future__ import annotations

import hmac
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

import psycopg
from fastapi import Depends, FastAPI, Header, HTTPException, Query
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from blocks.resources import Resources, resolve_resources
from bq_refresh.errors import ConfigError
from bq_refresh.settings import Settings, load_settings
from tasks import status as status_q
from tasks.registry import get_entry, list_entries, update_table


class ConfigUpdate(BaseModel):
    """A change to one registered table."""

    model_config = ConfigDict(extra="forbid")

    table: str = Field(description="schema.table or a table of the default schema")
    is_enabled: bool | None = None
    priority: int | None = None
    refresh_frequency_hours: int | None = Field(default=None, gt=0)
    custom_sync_params: dict[str, Any] | None = Field(default=None, description="Merged into the stored parameters.")


class TriggerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tables: list[str] | None = Field(default=None, description="None = every due table")
    full_refresh: bool = False
    dry_run: bool = False
    force: bool = False


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: from the environment)."""
    cfg = settings or load_settings()
    resources: dict[str, Resources] = {}
    app = FastAPI(title="bq-refresh", version="0.1.0",
                  description="Status, history, metrics, configuration and manual triggers of bq-refresh.")

    def res() -> Resources:
        if "r" not in resources:
            resources["r"] = resolve_resources(cfg)
        return resources["r"]

    def db() -> Iterator[psycopg.Connection[Any]]:
        try:
            conn = res().target.connect(autocommit=True)
        except psycopg.Error as exc:
            raise HTTPException(503, detail=f"database unreachable: {type(exc).__name__}") from None
        try:
            yield conn
        finally:
            conn.close()

    def check_token(authorization: str | None) -> None:
        if cfg.api_token is None:
            raise HTTPException(401, detail="REFRESH_API_TOKEN is not set: writes are disabled")
        expected = "Bearer " + cfg.api_token.get_secret_value()
        if authorization is None or not hmac.compare_digest(authorization.encode(), expected.encode()):
            raise HTTPException(401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def write_auth(authorization: Annotated[str | None, Header()] = None) -> None:
        check_token(authorization)

    def read_auth(authorization: Annotated[str | None, Header()] = None) -> None:
        if cfg.api_read_requires_token:
            check_token(authorization)

    read = [Depends(read_auth)]

    @app.get("/health", dependencies=read)
    def health() -> JSONResponse:
        """200 when the database answers and every enabled table succeeded within its frequency plus grace."""
        try:
            with res().target.connect(autocommit=True) as conn:
                tables = status_q.table_status(conn, cfg.schema_name, grace_hours=cfg.health_grace_hours)
        except psycopg.Error as exc:
            return JSONResponse({"status": "unhealthy", "database": "unreachable", "reasons": [type(exc).__name__]}, 503)
        problems = [{"table": t.table, "reason": t.reason} for t in tables if t.enabled and not t.healthy]
        body = {"status": "unhealthy" if problems else "healthy", "database": "ok",
                "tables_enabled": sum(1 for t in tables if t.enabled), "problems": problems}
        return JSONResponse(body, 503 if problems else 200)

    @app.get("/status", dependencies=read)
    def get_status(conn: psycopg.Connection[Any] = Depends(db)) -> list[dict[str, Any]]:
        return [t.as_dict() for t in status_q.table_status(conn, cfg.schema_name, grace_hours=cfg.health_grace_hours)]

    @app.get("/history", dependencies=read)
    def get_history(
        table: str | None = None, status: str | None = None, since: datetime | None = None,
        until: datetime | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0, conn: psycopg.Connection[Any] = Depends(db),
    ) -> dict[str, Any]:
        rows = status_q.history(conn, cfg.schema_name, table=table, status=status, since=since, until=until,
                                limit=limit, offset=offset)
        return {"items": rows, "limit": limit, "offset": offset, "next_offset": offset + len(rows) if len(rows) == limit else None}

    @app.get("/metrics", dependencies=read)
    def get_metrics(conn: psycopg.Connection[Any] = Depends(db)) -> list[dict[str, Any]]:
        return status_q.metrics(conn, cfg.schema_name)

    @app.get("/metrics/prometheus", dependencies=read, response_class=PlainTextResponse)
    def get_prometheus(conn: psycopg.Connection[Any] = Depends(db)) -> str:
        return status_q.prometheus_text(status_q.metrics(conn, cfg.schema_name))

    @app.get("/config", dependencies=read)
    def get_config(conn: psycopg.Connection[Any] = Depends(db)) -> list[dict[str, Any]]:
        return [{"table": e.name, "is_enabled": e.is_enabled, "priority": e.priority,
                 "refresh_frequency_hours": e.refresh_frequency_hours, "custom_sync_params": e.params,
                 "next_refresh_at": e.next_refresh_at, "watermark": e.watermark}
                for e in list_entries(conn, cfg.schema_name)]

    @app.put("/config", dependencies=[Depends(write_auth)])
    def put_config(change: ConfigUpdate, conn: psycopg.Connection[Any] = Depends(db)) -> dict[str, Any]:
        try:
            get_entry(conn, cfg.schema_name, change.table)
        except ConfigError as exc:
            raise HTTPException(404, detail=str(exc)) from None
        try:
            e = update_table(conn, cfg.schema_name, change.table, enabled=change.is_enabled, priority=change.priority,
                             frequency_hours=change.refresh_frequency_hours, params=change.custom_sync_params)
        except ConfigError as exc:
            raise HTTPException(422, detail=[{"loc": ["body", "custom_sync_params"], "msg": str(exc)}]) from None
        return {"table": e.name, "is_enabled": e.is_enabled, "priority": e.priority,
                "refresh_frequency_hours": e.refresh_frequency_hours, "custom_sync_params": e.params}

    @app.post("/trigger", dependencies=[Depends(write_auth)], status_code=202)
    def trigger(request: TriggerRequest) -> dict[str, Any]:
        """Start a daily-refresh run: through the Prefect API when a deployment is configured, else locally."""
        params = request.model_dump()
        if cfg.trigger_deployment:
            from prefect.deployments import run_deployment

            run = run_deployment(cfg.trigger_deployment, parameters=params, timeout=0)
            return {"mode": "deployment", "flow_run_id": str(run.id), "deployment": cfg.trigger_deployment}  # type: ignore[union-attr]
        trigger_id = uuid.uuid4().hex[:12]
        name = f"api-trigger-{trigger_id}"

        def run_locally() -> None:
            from flows.daily_refresh import daily_refresh

            daily_refresh.with_options(flow_run_name=name)(**params, return_state=True)

        threading.Thread(target=run_locally, name=name, daemon=True).start()
        return {"mode": "local", "flow_run_name": name, "trigger_id": trigger_id}

    return app
