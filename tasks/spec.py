"""TableSpec: how one registry row maps a BigQuery source onto a PostgreSQL table, validated."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bq_refresh.errors import ConfigError
from tasks.partitions import pseudo_column_refusal

_LOOKBACK = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def snake_case(name: str) -> str:
    """camelCase / PascalCase / "Mixed Name" -> snake_case."""
    name = re.sub(r"[\s\-]+", "_", name.strip())
    name = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name)
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return name.lower()


class DeletePolicy(BaseModel):
    """What happens to target rows whose key left the source."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["none", "hard", "soft"] = Field(
        default="none", description="none: keep them; hard: DELETE; soft: set soft_delete_column."
    )
    soft_delete_column: str = Field(default="deleted_at", description="timestamptz column set on soft delete.")
    max_delete_fraction: float = Field(
        default=0.5, ge=0, le=1, description="Refuse a run that would delete more than this share of the table."
    )


class ForeignKey(BaseModel):
    """Child columns of this table that must exist in a parent table."""

    model_config = ConfigDict(extra="forbid")

    columns: list[str] = Field(min_length=1, description="Target column names in this table.")
    parent: str = Field(description="schema.table of the parent (a live PostgreSQL table).")
    parent_columns: list[str] | None = Field(default=None, description="Default: the same names.")
    hard: bool = True


class QualityConfig(BaseModel):
    """The checks run on staged data before publishing (and on the live table after). Column names are
    target names. Hard checks stop the table with nothing published; soft ones only warn."""

    model_config = ConfigDict(extra="forbid")

    row_count: bool = Field(default=True, description="Rows read == the source's count for the window (hard).")
    checksum: bool = Field(default=True, description="Order-independent checksum of key + critical fields (hard).")
    foreign_keys: list[ForeignKey] = Field(default_factory=list)
    max_null_rate: dict[str, float] = Field(default_factory=dict, description="column -> highest share of NULLs")
    ranges: dict[str, tuple[float | None, float | None]] = Field(default_factory=dict, description="column -> [min, max]")
    not_greater_than: list[tuple[str, str]] = Field(default_factory=list, description="[a, b]: a <= b on every row")
    max_row_count_change: float | None = Field(default=None, ge=0, description="vs the previous run's rows read")
    hard: list[str] = Field(default_factory=lambda: ["row_count", "checksum", "published_count", "foreign_key",
                                                     "reconciliation"],
                            description="Check kinds that fail the table; the others warn.")


class Readiness(BaseModel):
    """When the source counts as loaded for tonight (tasks/readiness.py): re-checked every
    ``check_every_minutes`` up to ``wait_minutes``; past that the table is skipped and source_stale alerted."""

    model_config = ConfigDict(extra="forbid")

    modified_since_last_read: bool = Field(default=False, description="The source table's last modification "
                                           "(BigQuery table metadata) is after the snapshot of the last publish.")
    marker_table: str | None = Field(default=None, description="A BigQuery table (dataset.table) whose existence "
                                     "says the load is done; {date} is replaced by the run's UTC date, YYYYMMDD.")
    wait_minutes: float = Field(default=120, ge=0, description="How long to wait for the source at most.")
    check_every_minutes: float = Field(default=15, gt=0, description="How often to check again while waiting.")

    @model_validator(mode="after")
    def _one_condition(self) -> Readiness:
        if not self.modified_since_last_read and not self.marker_table:
            raise ValueError("give modified_since_last_read: true or a marker_table")
        return self


class TableSpec(BaseModel):
    """The sync parameters of one table (refresh_config.custom_sync_params)."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(default=None, description="BigQuery table: project.dataset.table, dataset.table or table.")
    query: str | None = Field(default=None, description="A SQL query whose result is the source (instead of source).")
    materialization_dataset: str | None = Field(
        default=None, min_length=1, pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_]+)?$",
        description="dataset or project.dataset where a query's (or a view's) result is written as a named table, "
                    "instead of the query job's anonymous result table: needed when a result is larger than an "
                    "anonymous table holds (roles/bigquery.dataEditor on that dataset only).")
    maximum_bytes_billed: int | None = Field(
        default=None, gt=0, description="The most bytes one BigQuery query or read of this table may scan: a larger "
                                        "dry-run or read-session estimate is refused before anything runs "
                                        "(default BIGQUERY_MAXIMUM_BYTES_BILLED).")
    target: str | None = Field(default=None, description="schema.table in PostgreSQL; default the registry row's.")
    key: list[str] = Field(min_length=1, description="Primary-key columns (source names).")
    cursor: str | None = Field(default=None, description="TIMESTAMP/DATETIME/DATE/INT64 column for incremental reads.")
    lookback: str = Field(default="0", description="Re-read window behind the watermark: 7d, 12h, 30m, 45s or an integer.")
    mode: Literal["incremental", "window", "full"] = "incremental"
    source_timezone: str = Field(default="UTC", description="Time zone of DATE and DATETIME cursor values "
                                 "(the watermark never moves past the read snapshot in that zone).")
    target_timezone: str = Field(default="UTC", description="Where the target declares a TIMESTAMP column "
                                 "`timestamp without time zone` (an adopted table): the wall time written there, "
                                 "in this zone (the default UTC: the UTC wall time).")
    window_column: str | None = Field(default=None, description="Period column restated as a whole (window mode).")
    max_vanished_periods: int = Field(default=1, ge=0, description="Window mode: more periods than this vanishing "
                                      "from the source in one run are deleted only with --allow-deletes.")
    batch_size: int | None = Field(default=None, gt=0, description="Rows per COPY batch and checkpoint.")
    streams: int = Field(default=1, ge=1, le=64, description="Storage Read API streams read in parallel.")
    columns: list[str] | None = Field(default=None, description="Source columns to sync (default all).")
    rename: dict[str, str] = Field(default_factory=dict, description="Source name -> target name.")
    snake_case: bool = Field(default=False, description="camelCase source names to snake_case target names.")
    transform: str | None = Field(default=None, description="Name of a registered Polars transform.")
    drift_policy: Literal["evolve", "freeze"] = "evolve"
    delete_policy: DeletePolicy = Field(default_factory=DeletePolicy)
    critical_fields: list[str] = Field(default_factory=list, description="Columns covered by the checksum (default all).")
    checks: QualityConfig = Field(default_factory=QualityConfig)
    shadow: bool = Field(default=False, description="Publish into the shadow schema instead of the live one.")
    row_hash: bool = Field(default=True, description="Keep a hash of each row of the target (in a side table of "
                           "the staging schema, never in the target) so that unchanged rows are never sent to "
                           "PostgreSQL again.")
    readiness: Readiness | None = Field(default=None, description="Wait for the source to be loaded before reading.")
    direct_initial_load: bool = Field(default=True, description="Load an empty target straight from the source "
                                      "and build its indexes afterwards, in one transaction.")
    auto_repair: bool = Field(default=False, description="When the weekly verify finds slices that differ from "
                              "the source, reload them at once (verify --repair) instead of only alerting.")
    verify_timeout_seconds: float | None = Field(default=None, ge=0, description="Verify of this table gives up "
                                                 "after this long, both sides' queries cancelled (default: "
                                                 "REFRESH_VERIFY_TIMEOUT_SECONDS; 0: no limit).")
    publish_group: str | None = Field(default=None, min_length=1, max_length=63, pattern=r"^[A-Za-z0-9_.-]+$",
                                      description="Tables that dashboards join: the group's tables are staged and "
                                      "checked each on its own and published together in one transaction, all or "
                                      "none (a member that fails holds the whole group at its previous data).")

    @field_validator("lookback")
    @classmethod
    def _lookback_format(cls, value: str) -> str:
        if not _LOOKBACK.match(str(value)):
            raise ValueError("use an integer with an optional unit s, m, h, d or w (e.g. 7d)")
        return str(value).strip()

    @field_validator("source_timezone", "target_timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as UTC or America/Los_Angeles)") from None
        return value

    @model_validator(mode="after")
    def _coherent(self) -> TableSpec:
        if (self.source is None) == (self.query is None):
            raise ValueError("give exactly one of source or query")
        if self.mode == "window" and not self.window_column:
            raise ValueError("window mode needs window_column")
        if self.mode == "incremental" and not self.cursor:
            raise ValueError("incremental mode needs a cursor column (or use mode full)")
        if self.source is not None:  # a query source may select a pseudo-column under a name of its own
            refusal = pseudo_column_refusal({"key": self.key, "cursor": [self.cursor] if self.cursor else [],
                                             "window": [self.window_column] if self.window_column else []})
            if refusal:
                raise ValueError(refusal)
        return self

    def lookback_amount(self) -> tuple[int, str]:
        """The lookback as (number, unit); unit '' means raw cursor units (INT64 cursors)."""
        m = _LOOKBACK.match(self.lookback)
        assert m is not None
        return int(m.group(1)), m.group(2)

    def lookback_delta(self) -> timedelta:
        amount, unit = self.lookback_amount()
        return timedelta(seconds=amount * _UNITS.get(unit or "s", 1))

    def target_name(self, source_name: str) -> str:
        """The PostgreSQL column name a source column lands in."""
        if source_name in self.rename:
            return self.rename[source_name]
        return snake_case(source_name) if self.snake_case else source_name

    @classmethod
    def parse_for(cls, table: str, params: dict[str, Any] | None) -> TableSpec:
        """Validate ``params`` for ``table``; errors name the table and the key."""
        try:
            return cls.model_validate(params or {})
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"]) or "custom_sync_params"
                problems.append(f"{where}: {err['msg']}")
            raise ConfigError("invalid sync parameters: " + "; ".join(problems), table=table) from None
