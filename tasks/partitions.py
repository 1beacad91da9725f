"""Partitioned sources: the partitioning a table's metadata declares, the partition filter a read of it must carry,
and the pseudo-columns a read session cannot give.

What BigQuery documents, and what follows from it here:

- A table with ``require_partition_filter`` refuses a read without "a filter that can be used for partition
  elimination": a query (cloud.google.com/bigquery/docs/querying-partitioned-tables, "Require a partition filter in
  queries") and a Storage Read API session alike, whose ``CreateReadSession`` answers INVALID_ARGUMENT "request
  failed: Cannot query over table '...' without a filter over column(s) '...' that can be used for partition
  elimination" (reported e.g. in GoogleCloudPlatform/DataflowTemplates#2273 and SAS Problem Note 68636 for a read
  session without ``row_restriction``). So every read session of such a table carries a partition predicate in its
  ``row_restriction`` (``restrict``).
- The same page: the filter qualifies when at least one predicate references only the partitioning column (``WHERE
  partition_id = "foo" AND f = "bar"`` qualifies, ``WHERE (partition_id = "foo" OR f = "bar")`` does not); for
  ingestion-time tables the column is the ``_PARTITIONTIME`` (or ``_PARTITIONDATE``) pseudo-column. A first (or
  full) load reads every partition, so it sends a predicate on the partitioning column alone that every row meets:
  ``col IS NULL OR col >= <the type's least value>`` (``always_true``). It names no other column, so it qualifies by
  the documented rule; it is not the bare tautology ``col IS NULL OR col IS NOT NULL`` an optimizer may fold away;
  and it keeps the rows whose partitioning value is NULL (the ``__NULL__`` partition of a column-partitioned table,
  and rows of an ingestion-time table still in the streaming buffer, whose ``_PARTITIONTIME`` is NULL:
  cloud.google.com/bigquery/docs/streaming-data-into-bigquery). It is ANDed to the read's own restriction (window,
  cursor), which keeps pruning where it names the partitioning column itself.
- Pseudo-columns are not in the table's schema (``tables.get`` lists the columns a user made; ``_PARTITIONTIME`` and
  ``_PARTITIONDATE`` are reserved names no column can take). A read session's ``selected_fields`` name schema
  columns, so a session cannot return them: ``_PARTITIONTIME`` cannot be a key, cursor or window column of a table
  source, whose values the refresh must read (``pseudo_column_refusal``); a query source can select it under a name
  of its own (``SELECT *, _PARTITIONTIME AS partition_time FROM ...``), whose result table the session then reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PSEUDO_COLUMNS = ("_PARTITIONTIME", "_PARTITIONDATE")
# The least value of each partitioning type (BigQuery's documented ranges of DATE, TIMESTAMP, DATETIME and INT64).
LEAST = {"DATE": "DATE '0001-01-01'", "TIMESTAMP": "TIMESTAMP '0001-01-01 00:00:00+00'",
         "DATETIME": "DATETIME '0001-01-01 00:00:00'", "INT64": str(-(2**63))}


@dataclass(frozen=True)
class Partitioning:
    """How a source table is partitioned: the column (a pseudo-column for ingestion time) and its type, and whether
    BigQuery refuses a read without a filter on it."""

    column: str
    type: str  # DATE, TIMESTAMP, DATETIME or INT64
    required: bool

    @classmethod
    def of(cls, table: Any, types: dict[str, str]) -> Partitioning | None:
        """From a ``google.cloud.bigquery.Table``'s metadata (``types``: its columns' BigQuery types), or None when
        it is not partitioned. ``require_partition_filter`` is the table's, or the older place inside
        ``timePartitioning`` (where tables made by DDL on the local emulator keep it)."""
        required = bool(getattr(table, "require_partition_filter", None))
        time_partitioning = getattr(table, "time_partitioning", None)
        if time_partitioning is not None:
            required = required or bool(time_partitioning.require_partition_filter)
            if time_partitioning.field:
                return cls(time_partitioning.field, _partition_type(types.get(time_partitioning.field)), required)
            return cls("_PARTITIONTIME", "TIMESTAMP", required)
        range_partitioning = getattr(table, "range_partitioning", None)
        if range_partitioning is not None and range_partitioning.field:
            return cls(range_partitioning.field, "INT64", required)
        return None


def _partition_type(bq_type: str | None) -> str:
    kind = (bq_type or "TIMESTAMP").upper()
    return {"INTEGER": "INT64"}.get(kind, kind)


def always_true(partitioning: Partitioning) -> str:
    """A predicate on the partitioning column alone that every row meets, NULL included."""
    column = _ident(partitioning.column)
    return f"({column} IS NULL OR {column} >= {LEAST[partitioning.type]})"


def partition_filter(table: Any, types: dict[str, str]) -> str:
    """The predicate every read session of this ``google.cloud.bigquery.Table`` must carry ('' when BigQuery requires
    none): ``always_true`` on its partitioning column when the table has ``require_partition_filter``."""
    partitioning = Partitioning.of(table, types)
    return always_true(partitioning) if partitioning is not None and partitioning.required else ""


def restrict(row_restriction: str, predicate: str) -> str:
    """``row_restriction`` with the table's partition ``predicate`` ANDed (unchanged without one, or when it already
    carries it: a session recreated from a checkpoint repeats the restriction it was opened with)."""
    if not predicate or predicate in row_restriction:
        return row_restriction
    return f"({row_restriction}) AND {predicate}" if row_restriction else predicate


def pseudo_column_refusal(roles: dict[str, list[str]]) -> str | None:
    """Why a table source cannot use a pseudo-column as its key, cursor or window column (None: it uses none).

    Args:
        roles: role ("key", "cursor", "window") -> the columns the spec names for it.
    """
    for role, columns in roles.items():
        for column in columns:
            if column.upper() in PSEUDO_COLUMNS:
                example = f"SELECT *, {column.upper()} AS partition_time FROM ..."  # noqa: S608 -- advice, never run
                return (f"{role} column {column} is a pseudo-column of an ingestion-time partitioned table: the Storage"
                        " Read API reads only the table's own columns, so it cannot be read; register a query source"
                        f" that names it instead (--query '{example}' with {role} partition_time)")
    return None


def _ident(name: str) -> str:
    if name.upper() in PSEUDO_COLUMNS:  # reserved names, written as BigQuery's documentation writes them
        return name.upper()
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"
