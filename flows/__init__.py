"""Entry points of bq-refresh: Prefect flows, the command line and the HTTP API."""

import bq_refresh  # noqa: F401 - first: it chooses Arrow's memory pool before pyarrow is imported
