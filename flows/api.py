"""The HTTP API: health, status, runs, history, metrics, config and trigger (FastAPI, with its OpenAPI document)."""

from __future__ import annotations

import hmac
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from importlib import resources as package_files
from typing import Annotated, Any
from uuid import UUID

import psycopg
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from blocks.resources import Resources, resolve_resources
from bq_refresh.errors import ConfigError
from bq_refresh.redact import redact
from bq_refresh.settings import Settings, load_settings
from tasks import metrics as metrics_q
from tasks import runs as runs_q
from tasks import status as status_q
from tasks.registry import due_entries, get_entry, list_entries, update_table
from tasks.sqlnames import split_qualified

log = logging.getLogger(__name__)

ALIAS_PREFIX = "/api/refresh"  # the earlier attempt's paths, which the users' dashboard calls
ALIAS_TAG = "earlier attempt's paths"
HEARTBEAT_S = 10.0
SILENT_S = 120.0  # a local run whose serve process has not beaten for this long is interrupted
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OUTCOME_KEYS = ("table", "status", "mode", "rows_read", "rows_inserted", "rows_updated", "rows_deleted",
                "execution_time_ms", "audit_id", "error", "reason")


TAGS = [
    {"name": "runs", "description": "Start a run and follow it by its run id."},
    {"name": "status", "description": "Per table: health, last result, what runs now; the audit log."},
    {"name": "metrics", "description": "Prometheus counters and gauges."},
    {"name": "config", "description": "The registry of tables."},
    {"name": "health", "description": "For probes and monitors."},
    {"name": ALIAS_TAG, "description": "The earlier attempt's paths under /api/refresh, which the users' dashboard"
                                       " calls: the same operations and bodies as the native paths."},
]
BEARER = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="The API token (REFRESH_API_TOKEN), sent as 'Authorization: Bearer <token>'.")


class ErrorBody(BaseModel):
    """An error: what went wrong, in a sentence a person can act on."""

    detail: str


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    described = {
        401: "No bearer token, or not the one in REFRESH_API_TOKEN (or none is set: writes are disabled).",
        404: "Not found: the table, or the run, named.",
        503: "PostgreSQL is unreachable, or its schema is not initialised (bq-refresh init).",
    }
    return {code: {"model": ErrorBody, "description": described[code]} for code in codes}


class ConfigUpdate(BaseModel):
    """A change to one registered table."""

    model_config = ConfigDict(extra="forbid")

    table: str = Field(description="schema.table or a table of the default schema", examples=["sqp.asin_weekly"])
    is_enabled: bool | None = None
    priority: int | None = None
    refresh_frequency_hours: int | None = Field(default=None, gt=0)
    custom_sync_params: dict[str, Any] | None = Field(default=None, description="Merged into the stored parameters.")


class TriggerRequest(BaseModel):
    """What to refresh now."""

    model_config = ConfigDict(extra="forbid")

    tables: list[str] | None = Field(default=None, description="Registered tables (schema.table, or a table of the"
                                     " default schema); none = every due table", examples=[["sqp.asin_weekly"]])
    full_refresh: bool = False
    dry_run: bool = False
    force: bool = False


class TriggerAnswer(BaseModel):
    """A run was started: follow it at ``GET /runs/{run_id}``."""

    run_id: str = Field(description="The refresh system's own run id (kept in PostgreSQL)")
    status: str
    mode: str = Field(description="local (in this process) or deployment (through the Prefect API)")
    tables: list[str] = Field(description="The tables it was due to refresh when it was asked for")
    status_url: str
    flow_run_id: str | None = None
    deployment: str | None = None


class LocalRuns:
    """Runs of the daily-refresh flow in this process: one Prefect API for all of them (a temporary server, started
    once under a lock, unless PREFECT_API_URL names one), a heartbeat for their records, and their end when the
    process stops."""

    def __init__(self, cfg: Settings, resources: Callable[[], Resources]) -> None:
        self.cfg, self.resources = cfg, resources
        self.served_by = f"{socket.gethostname()}:{os.getpid()}"
        self.lock = threading.Lock()
        self.active: set[str] = set()
        self.started_server: Any = None
        self.stopping = threading.Event()
        self.ticker: threading.Thread | None = None

    def start(self, run_id: str, params: dict[str, Any]) -> None:
        with self.lock:
            self.active.add(run_id)
            if self.ticker is None:
                self.ticker = threading.Thread(target=self._beat, name="bq-refresh-heartbeat", daemon=True)
                self.ticker.start()
        threading.Thread(target=self._run, args=(run_id, params), name=f"api-run-{run_id[:8]}", daemon=True).start()

    def prefect_api(self) -> str:
        """The Prefect API the runs use; a temporary server is started here, once, when none is configured (two
        runs starting at the same moment would otherwise each start one)."""
        from prefect.settings import PREFECT_API_URL

        configured = PREFECT_API_URL.value()
        if configured:
            return str(configured)
        with self.lock:
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer()  # the instance Prefect's own clients use when no URL is set
            if server.running and (server.server_process is None or server.server_process.poll() is not None):
                server.stop()  # it died: a fresh one
                server = SubprocessASGIServer()
            if not server.running:
                server.start()
                self.started_server = server
            return str(server.api_url)

    def _run(self, run_id: str, params: dict[str, Any]) -> None:
        schema = self.cfg.schema_name
        try:
            self.prefect_api()
            with self.resources().target.connect(autocommit=True) as conn:
                runs_q.mark_running(conn, schema, run_id)
            from flows.daily_refresh import daily_refresh, night_summary

            state: Any = daily_refresh.with_options(flow_run_name=f"api-{run_id[:8]}")(**params, return_state=True)
            flow_run_id = str(state.state_details.flow_run_id) if state.state_details.flow_run_id else None
            try:
                summary = night_summary(state)
                outcomes = [{k: r[k] for k in OUTCOME_KEYS if r.get(k) is not None} for r in summary["tables"]]
                status, error = ("failed" if summary["failed"] else "success"), None
                if summary["failed"]:
                    error = f"{len(summary['failed'])} table(s) failed: {', '.join(summary['failed'])}"
            except Exception as exc:  # noqa: BLE001 - the run failed before it had tables to report
                outcomes, status, error = [], "failed", f"{type(exc).__name__}: {exc}"
            with self.resources().target.connect(autocommit=True) as conn:
                runs_q.finish_run(conn, schema, run_id, status=status, outcomes=outcomes, error=error,
                                  flow_run_id=flow_run_id)
        except BaseException as exc:  # noqa: BLE001 - recorded; a thread has no one to raise to
            if not self.stopping.is_set():
                log.exception("API run %s failed", run_id)
                try:
                    with self.resources().target.connect(autocommit=True) as conn:
                        runs_q.finish_run(conn, schema, run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
                except Exception:  # noqa: BLE001 - the heartbeat stops; the record is closed as interrupted later
                    log.warning("API run %s: its record could not be closed", run_id)
        finally:
            with self.lock:
                self.active.discard(run_id)

    def _beat(self) -> None:
        while not self.stopping.wait(HEARTBEAT_S):
            with self.lock:
                ids = sorted(self.active)
            if not ids:
                continue
            try:
                with self.resources().target.connect(autocommit=True) as conn:
                    runs_q.beat(conn, self.cfg.schema_name, ids)
            except Exception as exc:  # noqa: BLE001 - the database may be back at the next beat
                log.warning("heartbeat of API runs failed: %s", exc)

    def shutdown(self, reason: str) -> None:
        """Close the records of the runs this process will not finish, and stop the Prefect server it started."""
        self.stopping.set()
        with self.lock:
            ids = sorted(self.active)
        if ids:
            try:
                with self.resources().target.connect(autocommit=True) as conn:
                    runs_q.interrupt(conn, self.cfg.schema_name, ids, reason)
            except Exception as exc:  # noqa: BLE001 - they are closed as interrupted when their heartbeat stops
                log.warning("could not close the records of runs %s: %s", ids, exc)
        if self.started_server is not None:
            self.started_server.stop()
            self.started_server = None


def _prefers_json(accept: str | None) -> bool:
    """Whether a client asked for JSON rather than the Prometheus text format (scrapers ask for text/plain or
    OpenMetrics, browsers and dashboards' fetch() for JSON or anything)."""
    accept = (accept or "").lower()
    return "application/json" in accept and "text/plain" not in accept and "openmetrics" not in accept


# The docs pages load nothing from elsewhere: ReDoc's bundle would fetch its attribution logo from Redocly's CDN.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline';"
            " img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'")


def _same_origin_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_CSP
    return page


def _static_dir() -> str:
    """Swagger UI's and ReDoc's files, shipped by the fastapi-offline package: /docs and /redoc need no internet."""
    return str(package_files.files("fastapi_offline") / "static")


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: from the environment)."""
    cfg = settings or load_settings()
    resources: dict[str, Resources] = {}

    def res() -> Resources:
        if "r" not in resources:
            resources["r"] = resolve_resources(cfg)
        return resources["r"]

    local = LocalRuns(cfg, res)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn ends here on SIGTERM or SIGINT, once requests in flight are answered.
        local.shutdown("bq-refresh serve stopped (SIGTERM) before the run finished; the next run of its tables"
                       " resumes from their checkpoints")

    app = FastAPI(
        title="bq-refresh", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_tags=TAGS,
        description="Status, runs, history, metrics, configuration and manual triggers of bq-refresh. Writes (and,"
                    " with REFRESH_API_READ_REQUIRES_TOKEN, reads) need the bearer token REFRESH_API_TOKEN: the"
                    " Authorize button. The earlier attempt's paths under /api/refresh answer as aliases.",
    )
    app.state.local_runs = local
    app.mount("/static", StaticFiles(directory=_static_dir()), name="static")

    @app.exception_handler(psycopg.OperationalError)
    async def database_down(_: Request, exc: psycopg.OperationalError) -> JSONResponse:
        return JSONResponse({"detail": f"database unreachable: {type(exc).__name__}"}, 503)

    @app.exception_handler(psycopg.errors.UndefinedTable)
    async def not_initialised(_: Request, exc: psycopg.errors.UndefinedTable) -> JSONResponse:
        return JSONResponse({"detail": f"schema {cfg.schema_name} is not initialised"
                                       f" ({exc.diag.message_primary}): run bq-refresh init"}, 503)

    def db() -> Iterator[psycopg.Connection[Any]]:
        try:
            conn = res().target.connect(autocommit=True)
        except psycopg.Error as exc:
            raise HTTPException(503, detail=f"database unreachable: {type(exc).__name__}") from None
        try:
            yield conn
        finally:
            conn.close()

    def check_token(credentials: HTTPAuthorizationCredentials | None) -> None:
        if cfg.api_token is None:
            raise HTTPException(401, detail="REFRESH_API_TOKEN is not set: writes are disabled")
        expected = ("Bearer " + cfg.api_token.get_secret_value()).encode()
        given = ("Bearer " + credentials.credentials).encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected):
            raise HTTPException(401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    def write_auth(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> None:
        check_token(credentials)

    def read_auth(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> None:
        check_token(credentials)

    # Reads carry the bearer scheme in the OpenAPI document only when they need it.
    read: list[Any] = [Depends(read_auth)] if cfg.api_read_requires_token else []
    read_errors = (401, 503) if cfg.api_read_requires_token else (503,)
    write = [Depends(write_auth)]

    def route(method: str, path: str, *, alias: bool = True, **kwargs: Any) -> Callable[[Any], Any]:
        """Declare ``path``, and the earlier attempt's ``/api/refresh`` + ``path`` with the same body (``alias``)."""
        def register(endpoint: Any) -> Any:
            app.add_api_route(path, endpoint, methods=[method], **kwargs)
            if alias:
                summary = kwargs["summary"]
                app.add_api_route(ALIAS_PREFIX + path, endpoint, methods=[method],
                                  **{**kwargs, "tags": [ALIAS_TAG], "summary": f"{summary} (alias of {path})",
                                     "description": f"The same as `{method} {path}`: the earlier attempt's path."})
            return endpoint
        return register

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _same_origin_only(get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"), title="bq-refresh API",
            swagger_js_url=f"{root}/static/swagger-ui-bundle.js", swagger_css_url=f"{root}/static/swagger-ui.css",
            swagger_favicon_url=f"{root}/static/favicon.png",
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True}))

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _same_origin_only(get_redoc_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"), title="bq-refresh API",
            redoc_js_url=f"{root}/static/redoc.standalone.js", redoc_favicon_url=f"{root}/static/favicon.png",
            with_google_fonts=False))

    @app.get("/healthz", tags=["health"], summary="Liveness and database (for probes)", responses=_responses(503))
    def healthz() -> JSONResponse:
        """For an orchestrator's probe: 200 while the API answers and reaches PostgreSQL, else 503."""
        try:
            with psycopg.connect(res().target.uri(), connect_timeout=3, autocommit=True) as conn:
                conn.execute("SELECT 1")
        except (psycopg.Error, OSError) as exc:
            return JSONResponse({"status": "unavailable", "database": f"unreachable: {type(exc).__name__}"}, 503)
        return JSONResponse({"status": "ok", "database": "ok", "runs_in_this_process": len(local.active)})

    @app.get("/health", dependencies=read, tags=["health"], summary="Health of the tables", responses=_responses(*read_errors))
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

    @route("GET", "/status", dependencies=read, tags=["status"], summary="Tables and runs in progress", responses=_responses(*read_errors))
    def get_status(conn: psycopg.Connection[Any] = Depends(db)) -> dict[str, Any]:
        """Per table: health, last result, data as of, next due; and the runs in progress, per table with its phase
        and the rows staged of those expected (when known)."""
        runs_q.interrupt_silent(conn, cfg.schema_name, silent_s=SILENT_S)
        return {
            "tables": [t.as_dict() for t in status_q.table_status(conn, cfg.schema_name,
                                                                  grace_hours=cfg.health_grace_hours)],
            "in_progress": status_q.in_progress(conn, cfg.schema_name),
            "runs": [_run_body(conn, r) for r in runs_q.active_runs(conn, cfg.schema_name)],
        }

    def _run_body(conn: psycopg.Connection[Any], run: dict[str, Any]) -> dict[str, Any]:
        """A run as GET /runs/{id} shows it: per table, its outcome once the run ended; while it runs, each table's
        phase (running), outcome (done since the run started) or pending."""
        body = {k: run[k] for k in ("status", "mode", "parameters", "requested_at", "started_at", "finished_at",
                                    "flow_run_id", "deployment", "error")}
        body = {"run_id": run["id"], **body}
        if run["status"] not in runs_q.ACTIVE:
            body["tables"] = run["outcomes"] or [{"table": t, "status": "not run"} for t in run["tables"]]
            return body
        running = {p["table"]: p for p in status_q.in_progress(conn, cfg.schema_name)}
        since = run["started_at"] or run["requested_at"]
        tables = []
        for name in run["tables"]:
            if name in running and running[name]["started_at"] >= since:
                p = running[name]
                tables.append({"table": name, "status": "running", **{k: p[k] for k in (
                    "phase", "rows_staged", "rows_unchanged", "rows_expected", "seconds", "audit_id")}})
                continue
            done = status_q.history(conn, cfg.schema_name, table=name, since=since, limit=1)
            if done:
                d = done[0]
                tables.append({"table": name, "status": d["status"], "audit_id": d["id"],
                               **{k: d[k] for k in ("rows_processed", "rows_inserted", "rows_updated",
                                                    "rows_deleted", "execution_time_ms", "error_message")}})
            else:
                tables.append({"table": name, "status": "pending"})
        body["tables"] = tables
        return body

    @app.get("/runs/{run_id}", dependencies=read, tags=["runs"], summary="One run and its tables", responses=_responses(404, *read_errors))
    def get_run(run_id: UUID, conn: psycopg.Connection[Any] = Depends(db)) -> dict[str, Any]:
        """One run started by POST /trigger: status (queued, running, success, failed, interrupted, cancelled),
        when it started and finished, and its tables with their outcomes (while it runs: phase and rows staged)."""
        runs_q.interrupt_silent(conn, cfg.schema_name, silent_s=SILENT_S)
        run = runs_q.get_run(conn, cfg.schema_name, str(run_id))
        if run is None:
            raise HTTPException(404, detail=f"no run {run_id} (POST /trigger answers a run_id)")
        if run["mode"] == "deployment" and run["status"] in runs_q.ACTIVE:
            run = _follow_deployment_run(conn, run)
        return _run_body(conn, run)

    def _follow_deployment_run(conn: psycopg.Connection[Any], run: dict[str, Any]) -> dict[str, Any]:
        """Bring a deployment run's record up to date from the Prefect API (the worker runs it)."""
        from prefect.client.orchestration import get_client

        try:
            with get_client(sync_client=True) as client:
                flow_run = client.read_flow_run(UUID(run["flow_run_id"]))
        except Exception as exc:  # noqa: BLE001 - the record stands as it is; said in the answer
            run["error"] = f"Prefect API unreachable ({type(exc).__name__}); status as last known"
            return run
        state = flow_run.state
        if state is None or not state.is_final():
            if state is not None and state.is_running():
                runs_q.mark_running(conn, cfg.schema_name, run["id"])
            return runs_q.get_run(conn, cfg.schema_name, run["id"]) or run
        status = "success" if state.is_completed() else "cancelled" if state.is_cancelled() else "failed"
        since = flow_run.start_time or run["requested_at"]
        outcomes = []
        for name in run["tables"]:
            done = status_q.history(conn, cfg.schema_name, table=name, since=since, until=flow_run.end_time, limit=1)
            outcomes.append({"table": name, "status": done[0]["status"], "audit_id": done[0]["id"]} if done
                            else {"table": name, "status": "not run"})
        runs_q.finish_run(conn, cfg.schema_name, run["id"], status=status, outcomes=outcomes,
                          error=None if status == "success" else (state.message or state.type.value))
        return runs_q.get_run(conn, cfg.schema_name, run["id"]) or run

    @route("GET", "/history", dependencies=read, tags=["status"], summary="Audit rows", responses=_responses(*read_errors))
    def get_history(
        table: str | None = None, status: str | None = None, since: datetime | None = None,
        until: datetime | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0, conn: psycopg.Connection[Any] = Depends(db),
    ) -> dict[str, Any]:
        """Audit rows, newest first, by table, status and time; ``next_offset`` for the next page."""
        rows = status_q.history(conn, cfg.schema_name, table=table, status=status, since=since, until=until,
                                limit=limit, offset=offset)
        return {"items": rows, "limit": limit, "offset": offset, "next_offset": offset + len(rows) if len(rows) == limit else None}

    metrics_content = {"text/plain": {"schema": {"type": "string"}},
                       "application/json": {"schema": {"type": "array", "items": {"type": "object"}}}}

    @route("GET", "/metrics", dependencies=read, tags=["metrics"], summary="Prometheus metrics", response_class=Response,
           responses={200: {"content": metrics_content, "description": "Prometheus text format, or JSON when the"
                            " request accepts application/json (and not text/plain)."}, **_responses(*read_errors)})
    def get_metrics(request: Request, conn: psycopg.Connection[Any] = Depends(db)) -> Response:
        """Prometheus metrics: counters that never go down (runs, successes, failures, skipped, rows by kind, run
        seconds; kept per table in refresh_totals, which archiving audit rows does not touch), gauges over 30 days
        (`*_30d`) and of the runs in progress. With `Accept: application/json`: per table over 30 days, with the
        totals."""
        window = status_q.metrics(conn, cfg.schema_name)
        totals = metrics_q.totals(conn, cfg.schema_name)
        if _prefers_json(request.headers.get("accept")):
            by_table = {t["table"]: t for t in totals}
            for w in window:
                w["totals"] = {k: v for k, v in by_table.get(w["table"], {}).items() if k != "table"} or None
            return JSONResponse(_jsonable(window))
        now = datetime.now(UTC)
        text = metrics_q.prometheus_text(totals, window, status_q.in_progress(conn, cfg.schema_name), now)
        return Response(text, media_type=PROMETHEUS_TYPE)

    @app.get("/metrics/prometheus", dependencies=read, tags=["metrics"], summary="Prometheus metrics (old path)", response_class=Response, deprecated=True,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}, **_responses(*read_errors)})
    def get_prometheus(conn: psycopg.Connection[Any] = Depends(db)) -> Response:
        """The Prometheus text format (what GET /metrics answers by default)."""
        text = metrics_q.prometheus_text(metrics_q.totals(conn, cfg.schema_name), status_q.metrics(conn, cfg.schema_name),
                                         status_q.in_progress(conn, cfg.schema_name), datetime.now(UTC))
        return Response(text, media_type=PROMETHEUS_TYPE)

    @route("GET", "/config", dependencies=read, tags=["config"], summary="The registry", responses=_responses(*read_errors))
    def get_config(conn: psycopg.Connection[Any] = Depends(db)) -> list[dict[str, Any]]:
        """The registry: every table with its schedule, priority, sync parameters and watermark."""
        return [{"table": e.name, "is_enabled": e.is_enabled, "priority": e.priority,
                 "refresh_frequency_hours": e.refresh_frequency_hours, "custom_sync_params": e.params,
                 "next_refresh_at": e.next_refresh_at, "watermark": e.watermark}
                for e in list_entries(conn, cfg.schema_name)]

    @route("PUT", "/config", dependencies=write, tags=["config"], summary="Change a table", responses=_responses(401, 404, 503))
    def put_config(change: ConfigUpdate, conn: psycopg.Connection[Any] = Depends(db)) -> dict[str, Any]:
        """Change one registered table (bearer token); invalid sync parameters are refused naming the key."""
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

    @route("POST", "/trigger", dependencies=write, status_code=202, tags=["runs"], summary="Start a run", response_model=TriggerAnswer,
           responses=_responses(401, 404, 503))
    def trigger(request: TriggerRequest, conn: psycopg.Connection[Any] = Depends(db)) -> TriggerAnswer:
        """Start a daily-refresh run (bearer token) and answer its run id at once: through the Prefect API when
        REFRESH_TRIGGER_DEPLOYMENT names a deployment (a worker runs it), else in this process. An unknown table
        is refused (404) naming it, before anything starts."""
        schema = cfg.schema_name
        registered = {e.name for e in list_entries(conn, schema)}
        unknown = sorted({n for n in request.tables or [] if ".".join(split_qualified(n, schema)) not in registered})
        if unknown:
            raise HTTPException(404, detail=f"not registered: {', '.join(unknown)} (GET /config lists the registered"
                                            " tables)")
        planned = [e.name for e in due_entries(conn, schema, names=request.tables or None, force=request.force)]
        params = request.model_dump()
        if cfg.trigger_deployment:
            return _trigger_deployment(conn, params, planned)
        run_id = runs_q.create_run(conn, schema, mode="local", parameters=params, tables=planned,
                                   served_by=local.served_by)
        local.start(run_id, params)
        return TriggerAnswer(run_id=run_id, status="queued", mode="local", tables=planned, status_url=f"/runs/{run_id}")

    def _trigger_deployment(conn: psycopg.Connection[Any], params: dict[str, Any], planned: list[str]) -> TriggerAnswer:
        from prefect.deployments import run_deployment

        deployment = str(cfg.trigger_deployment)
        run_id = runs_q.create_run(conn, cfg.schema_name, mode="deployment", parameters=params, tables=planned,
                                   deployment=deployment)
        try:
            flow_run = run_deployment(deployment, parameters=params, timeout=0, flow_run_name=f"api-{run_id[:8]}")
        except Exception as exc:  # noqa: BLE001 - the record says why; the caller gets 503
            message = redact(f"{type(exc).__name__}: {exc}")
            runs_q.finish_run(conn, cfg.schema_name, run_id, status="failed", error=message)
            raise HTTPException(503, detail=f"Prefect did not start {deployment} (is PREFECT_API_URL the server its"
                                            f" worker polls?): {message}") from None
        flow_run_id = str(flow_run.id)  # type: ignore[union-attr]
        runs_q.attach_flow_run(conn, cfg.schema_name, run_id, flow_run_id)
        return TriggerAnswer(run_id=run_id, status="queued", mode="deployment", tables=planned,
                             status_url=f"/runs/{run_id}", flow_run_id=flow_run_id, deployment=deployment)

    return app


def _jsonable(value: Any) -> Any:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(value)
