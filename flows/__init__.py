"""Entry points of bq-refresh: Prefect flows, the command line and the HTTP API."""
