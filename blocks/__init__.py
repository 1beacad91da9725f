"""Prefect blocks for bq-refresh: the BigQuery source, the PostgreSQL target, and how to pick them."""

import bq_refresh  # noqa: F401 - first: it chooses Arrow's memory pool before pyarrow is imported
from blocks.bigquery import BigQuerySource
from blocks.postgres import PostgresTarget
from blocks.resources import Resources, resolve_resources

__all__ = ["BigQuerySource", "PostgresTarget", "Resources", "resolve_resources"]
