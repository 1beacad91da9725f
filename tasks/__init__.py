"""The units of work of bq-refresh, one module per concern; Prefect tasks are thin wrappers."""
