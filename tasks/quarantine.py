"""Rows set aside instead of loaded (a NULL in a key column): the one writer of refresh_quarantine.

Both load paths (staged batches and the direct load) call it inside the transaction that loads the batch, so a
quarantined row is recorded exactly when its batch lands. Maintenance archives the table with the audit rows.
"""

from __future__ import annotations

import json
from typing import Any

from tasks.sqlnames import quote_ident

NULL_KEY = "NULL in a key column"


def set_aside(adbc_conn: Any, registry_schema: str, audit_id: int | None, table: str,
              rows: list[dict[str, Any]], reason: str = NULL_KEY) -> None:
    """Record ``rows`` (each as JSON) in refresh_quarantine, in the caller's open ADBC transaction.

    Args:
        adbc_conn: the ADBC connection whose transaction loads the rows' batch (committed by the caller).
        registry_schema: the schema of bq-refresh's own tables.
        audit_id: the run's audit row.
        table: the table as ``schema.name``.
        rows: the rows set aside, column name to value (values not JSON-native are written as text).
        reason: why they were set aside.
    """
    if not rows:
        return
    table_schema, table_name = table.split(".", 1)
    with adbc_conn.cursor() as cur:
        for row in rows:
            cur.execute(
                f"INSERT INTO {quote_ident(registry_schema)}.refresh_quarantine"  # noqa: S608 - a quoted identifier
                " (audit_log_id, table_schema, table_name, reason, row_data)"
                " VALUES ($1::int, $2::text, $3::text, $4::text, $5::text::jsonb)",
                parameters=(audit_id, table_schema, table_name, reason, json.dumps(row, default=str)),
            )
