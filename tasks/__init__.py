"""The units of work of bq-refresh, one module per concern; Prefect tasks are thin wrappers."""

import bq_refresh  # noqa: F401 - first: it chooses Arrow's memory pool before pyarrow is imported
