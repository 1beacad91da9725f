"""Settings of bq-refresh: every knob, its environment variable and its default, in one place."""

from __future__ import annotations

import os
from datetime import time
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SCHEMA = "sqp"
DEFAULT_STAGING_SCHEMA = "sqp_staging"
DEFAULT_BATCH_SIZE = 50_000  # rows per COPY and checkpoint; bench/run.py: 5k-row batches cost ~0.5 s per 1M rows in commits
DEFAULT_PROJECT = "bq-refresh-local"
DEFAULT_DATASET = "sqp_source"
# The settings that point at a BigQuery of the user's own: any of them set, a running demo emulator is not used.
BIGQUERY_FIELDS = frozenset({"bigquery_project_id", "bigquery_dataset", "bigquery_location", "bigquery_api_endpoint",
                             "bigquery_storage_endpoint", "google_credentials_json"})


def default_state_dir() -> Path:
    """$XDG_STATE_HOME/bq-refresh, or ~/.local/state/bq-refresh (the XDG default; a relative XDG_STATE_HOME is
    ignored, as the XDG specification asks): the same folder from whatever directory a command runs."""
    xdg = os.environ.get("XDG_STATE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "state"
    return base / "bq-refresh"


class StateSettings(BaseSettings):
    """Where the local state lives; read alone before Prefect is imported (bq_refresh.offline)."""

    # A .env in the current directory is read too; the environment wins over it.
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True, env_file=".env")

    state_dir: Path = Field(
        default_factory=default_state_dir, validation_alias="BQ_REFRESH_STATE_DIR",
        description="Local state: the embedded PostgreSQL, the demo's BigQuery emulator, the Prefect home.")

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Made absolute once: a Prefect worker or a thread in another directory finds the same folder.
        return value.expanduser().absolute()


class Settings(StateSettings):
    """Runtime configuration, read from the environment and a .env in the current directory.

    Unset database URL means the embedded PostgreSQL; unset BigQuery endpoints mean real Google, or the demo's
    emulator while it runs and nothing else is configured (``load_settings``).
    """

    database_url: SecretStr | None = Field(
        default=None,
        validation_alias="BQ_REFRESH_DATABASE_URL",
        description="PostgreSQL URI of the target; unset = the embedded PostgreSQL in the state folder.",
    )
    target_block: str | None = Field(
        default=None, validation_alias="BQ_REFRESH_TARGET_BLOCK",
        description="Name of a saved 'bq-refresh PostgreSQL target' block (PostgresTarget) on the Prefect server: the "
                    "target, instead of BQ_REFRESH_DATABASE_URL.")
    source_block: str | None = Field(
        default=None, validation_alias="BQ_REFRESH_SOURCE_BLOCK",
        description="Name of a saved 'bq-refresh BigQuery source' block (BigQuerySource) on the Prefect server: the "
                    "source, instead of the BIGQUERY_* settings.")
    schema_name: str = Field(default=DEFAULT_SCHEMA, validation_alias="BQ_REFRESH_SCHEMA")
    staging_schema: str = Field(default=DEFAULT_STAGING_SCHEMA, validation_alias="BQ_REFRESH_STAGING_SCHEMA")
    shadow_schema_setting: str | None = Field(default=None, validation_alias="BQ_REFRESH_SHADOW_SCHEMA")

    bigquery_project_id: str = Field(default=DEFAULT_PROJECT, validation_alias="BIGQUERY_PROJECT_ID")
    bigquery_dataset: str = Field(default=DEFAULT_DATASET, validation_alias="BIGQUERY_DATASET")
    bigquery_location: str | None = Field(default=None, validation_alias="BIGQUERY_LOCATION")
    bigquery_api_endpoint: str | None = Field(default=None, validation_alias="BIGQUERY_API_ENDPOINT")
    bigquery_storage_endpoint: str | None = Field(default=None, validation_alias="BIGQUERY_STORAGE_ENDPOINT")
    bigquery_storage_honours_offsets: bool | None = Field(
        default=None, validation_alias="BIGQUERY_STORAGE_HONOURS_OFFSETS",
        description="The Storage Read endpoint starts ReadRows at the requested offset (BigQuery does); unset: not when"
                    " BIGQUERY_STORAGE_ENDPOINT is set (the local emulator restarts every call at row 0).")
    google_credentials_json: SecretStr | None = Field(
        default=None, validation_alias="GOOGLE_APPLICATION_CREDENTIALS_JSON"
    )
    bigquery_timeout_s: float = Field(
        default=60.0, gt=0, validation_alias="BIGQUERY_TIMEOUT_SECONDS",
        description="How long a BigQuery that gives no answer is tried, Google's retries, ours and Prefect's task "
                    "retries together (tasks/deadline.py); a run's first such error is said within 15 s.")
    bigquery_query_timeout_s: float = Field(
        default=21600.0, gt=0, validation_alias="BIGQUERY_QUERY_TIMEOUT_SECONDS",
        description="How long a query or view source's query job may run (each look at it is one request within "
                    "BIGQUERY_TIMEOUT_SECONDS); past it the job is cancelled. Default: BigQuery's own 6 hours.")
    bigquery_maximum_bytes_billed: int | None = Field(
        default=None, gt=0, validation_alias="BIGQUERY_MAXIMUM_BYTES_BILLED",
        description="Default per-table budget: a query whose dry run, or a read whose read session, BigQuery estimates "
                    "above this many bytes is refused before it runs (a table's maximum_bytes_billed wins).")

    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, gt=0, validation_alias="REFRESH_BATCH_SIZE")
    timeout_warning_ms: int = Field(default=240_000, validation_alias="REFRESH_TIMEOUT_WARNING_MS")
    lock_wait_s: float = Field(default=30.0, validation_alias="REFRESH_LOCK_WAIT_SECONDS")
    checkpoint_ttl_hours: int = Field(default=24, validation_alias="REFRESH_CHECKPOINT_TTL_HOURS")
    webhook_url: str | None = Field(
        default=None, validation_alias="REFRESH_WEBHOOK_URL", description="One or more URLs, comma-separated."
    )
    webhook_secret: SecretStr | None = Field(default=None, validation_alias="REFRESH_WEBHOOK_SECRET")
    api_token: SecretStr | None = Field(default=None, validation_alias="REFRESH_API_TOKEN")
    notification_block: str | None = Field(
        default=None, validation_alias="REFRESH_NOTIFICATION_BLOCK",
        description="A saved Prefect notification block, 'block-type/name' (e.g. slack-webhook/ops), that also gets alerts.",
    )
    webhook_timeout_s: float = Field(default=5.0, validation_alias="REFRESH_WEBHOOK_TIMEOUT_SECONDS")
    webhook_attempts: int = Field(default=3, ge=1, validation_alias="REFRESH_WEBHOOK_ATTEMPTS")
    retry_delay_s: float = Field(default=2.0, ge=0, validation_alias="REFRESH_RETRY_DELAY_SECONDS")
    retries: int = Field(default=3, ge=0, validation_alias="REFRESH_RETRIES")
    table_timeout_s: float = Field(default=3600.0, gt=0, validation_alias="REFRESH_TABLE_TIMEOUT_SECONDS")
    # Every session the refresh opens sets these itself (a role's own defaults, e.g. Supabase's statement_timeout,
    # must not kill a COPY, a merge or an index build); a value given in the URI's options (-c ...) wins.
    statement_timeout_s: float | None = Field(
        default=None, gt=0, validation_alias="REFRESH_STATEMENT_TIMEOUT_SECONDS",
        description="Longest statement (a COPY, a merge, an index build); default REFRESH_TABLE_TIMEOUT_SECONDS.")
    max_connections: int | None = Field(
        default=None, ge=5, validation_alias="REFRESH_MAX_CONNECTIONS",
        description="Most PostgreSQL sessions a night's run holds at once: tables start only while their sessions "
                    "(3 + read streams each, + 1 for the parent flow) fit, and a table's streams are capped to fit "
                    "alone. Set it to the pooler's pool size (or less) on a small Supabase plan.")
    lock_timeout_s: float = Field(default=60.0, gt=0, validation_alias="REFRESH_LOCK_TIMEOUT_SECONDS",
                                  description="Longest wait for a table lock (DDL, the publish).")
    idle_in_transaction_timeout_s: float = Field(
        default=600.0, gt=0, validation_alias="REFRESH_IDLE_IN_TRANSACTION_TIMEOUT_SECONDS",
        description="A session of ours left idle inside a transaction this long is ended by the server.")
    index_rebuild_min_rows: int = Field(
        default=100_000, ge=0, validation_alias="REFRESH_INDEX_REBUILD_MIN_ROWS",
        description="Loads of at least this many rows into an EMPTY table drop and rebuild its secondary indexes "
                    "(bench/index_rebuild.py: 1M rows 11.3 s -> 8.7 s).",
    )
    index_build_memory_mb: int = Field(
        default=256, ge=64, validation_alias="REFRESH_INDEX_BUILD_MEMORY_MB",
        description="maintenance_work_mem of the transaction that builds a target's indexes after a direct load.",
    )
    analyze_changed_fraction: float = Field(
        default=0.1, ge=0, validation_alias="REFRESH_ANALYZE_CHANGED_FRACTION",
        description="A publish that inserted, updated and deleted more rows than this share of the table (the "
                    "planner's row estimate before it) is followed by ANALYZE of the table (after its COMMIT; a "
                    "failure is recorded in the audit row, never fails the run).",
    )
    disk_budget_mb: float | None = Field(
        default=None, gt=0, validation_alias="REFRESH_DISK_BUDGET_MB",
        description="The disk the database may fill (a Supabase plan's disk size): a full or initial load whose "
                    "estimated need exceeds it minus what the database (and WAL, where readable) uses is refused "
                    "before it loads anything. Unset: PostgreSQL cannot tell the free space, nothing is refused.",
    )
    verify_sample: int = Field(
        default=16, ge=1, validation_alias="REFRESH_VERIFY_SAMPLE",
        description="Tables with row hashes: 1 row in N (a power of 2) is read back after the load and verified "
                    "value by value (bench/: reading every row back cost 6.5 s of a 12 s 1M-row load).",
    )
    verify_sample_min_rows: int = Field(default=200_000, ge=0, validation_alias="REFRESH_VERIFY_SAMPLE_MIN_ROWS",
                                        description="Smaller reads are verified whole.")
    verify_timeout_s: float = Field(
        default=3600.0, ge=0, validation_alias="REFRESH_VERIFY_TIMEOUT_SECONDS",
        description="Verify of one table gives up after this long, both sides' queries cancelled, the table reported "
                    "not verified (a table's verify_timeout_seconds wins; 0: no limit).",
    )
    repair_max_rows: int = Field(
        default=1000, ge=0, validation_alias="REFRESH_REPAIR_MAX_ROWS",
        description="bq-refresh verify --repair: up to this many differing rows are re-read by key and replaced one "
                    "by one; more (or rows whose key has no simple literal) reload their periods whole (window mode) "
                    "or the table (a full refresh). 0: always by period or table.",
    )
    schedule_anchor: time = Field(
        default=time(2, 0), validation_alias="REFRESH_SCHEDULE_ANCHOR",
        description="UTC time of day the nightly schedule starts (HH:MM); a table's due slots are counted from it "
                    "(a daily table refreshed at any time of a day is due at the next day's anchor).",
    )
    due_tolerance_minutes: float = Field(
        default=15.0, ge=0, validation_alias="REFRESH_DUE_TOLERANCE_MINUTES",
        description="A run that starts up to this much before a table's slot still refreshes it.",
    )
    staging_logged: bool = Field(
        default=False, validation_alias="REFRESH_STAGING_LOGGED",
        description="WAL-logged staging tables instead of UNLOGGED ones. Either way a resume and a publish prove "
                    "staging against the checkpoint; docs/benchmarks.md has what logging costs.",
    )
    health_grace_hours: float = Field(default=2.0, ge=0, validation_alias="REFRESH_HEALTH_GRACE_HOURS")
    source_stale_hours: float = Field(
        default=36.0, gt=0, validation_alias="REFRESH_SOURCE_STALE_HOURS",
        description="A run that read nothing from a source (without a readiness condition) whose last modification "
                    "is older than this alerts source_stale, once until the source changes.",
    )
    view_failure_status: Literal["warning", "failed"] = Field(
        default="warning", validation_alias="REFRESH_VIEW_FAILURE_STATUS",
        description="What a table run becomes when a dependent materialized view fails its refresh or a dependent "
                    "view no longer answers its probe (the data itself was published).",
    )
    api_read_requires_token: bool = Field(default=False, validation_alias="REFRESH_API_READ_REQUIRES_TOKEN")
    trigger_deployment: str | None = Field(
        default=None, validation_alias="REFRESH_TRIGGER_DEPLOYMENT",
        description="'flow/deployment' that POST /trigger starts through the Prefect API; unset = a local run.",
    )
    daily_summary_alert: bool = Field(default=False, validation_alias="REFRESH_DAILY_SUMMARY_ALERT")
    log_retention_days: int = Field(
        default=30, ge=1, validation_alias="REFRESH_LOG_RETENTION_DAYS",
        description="Weekly maintenance deletes completed/expired checkpoints, alert-log rows and view-refresh "
                    "log rows older than this (never an active checkpoint; each view's latest row is kept).",
    )
    audit_retention_days: int = Field(
        default=90, ge=1, validation_alias="REFRESH_AUDIT_RETENTION_DAYS",
        description="Weekly maintenance moves audit rows older than this (with their quality and quarantine rows) "
                    "to the archive tables.",
    )
    prefect_ui_url: str | None = Field(default=None, validation_alias="PREFECT_UI_URL")

    @field_validator("verify_sample")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("REFRESH_VERIFY_SAMPLE must be a power of 2 (1, 2, 4, ... 16, ...)")
        return value

    @property
    def session_timeouts(self) -> dict[str, int]:
        """The timeouts (ms) every PostgreSQL session of the refresh sets for itself."""
        return {"statement_timeout": int((self.statement_timeout_s or self.table_timeout_s) * 1000),
                "lock_timeout": int(self.lock_timeout_s * 1000),
                "idle_in_transaction_session_timeout": int(self.idle_in_transaction_timeout_s * 1000)}

    @property
    def shadow_schema(self) -> str:
        """Where shadow-mode tables are published (default: "<schema>_shadow")."""
        return self.shadow_schema_setting or f"{self.schema_name}_shadow"

    @property
    def uses_emulator(self) -> bool:
        return self.bigquery_api_endpoint is not None

    @property
    def is_embedded_default(self) -> bool:
        """Neither a database nor a BigQuery of the user's own is configured: the embedded PostgreSQL, and the
        demo's emulator when one runs in the state folder."""
        return (self.database_url is None and not self.model_fields_set & BIGQUERY_FIELDS
                and self.target_block is None and self.source_block is None
                and "GOOGLE_APPLICATION_CREDENTIALS" not in os.environ)


def load_settings() -> Settings:
    """Read the settings from the environment (and .env) now, not at import time.

    On the embedded default, a BigQuery emulator that ``bq-refresh demo --keep-up`` left running in the state
    folder is the source (its endpoints and project), so that every command finds the demo's data by itself.
    """
    settings = Settings()
    if settings.is_embedded_default:
        from bq_refresh.services import running_emulator

        emulator = running_emulator(settings.state_dir)
        if emulator is not None:
            settings = settings.model_copy(update={
                "bigquery_api_endpoint": emulator.rest_url, "bigquery_storage_endpoint": emulator.grpc_target,
                "bigquery_project_id": emulator.project or settings.bigquery_project_id})
    return settings
