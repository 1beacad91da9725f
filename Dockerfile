# bq-refresh worker image: the project installed at /opt/bq-refresh (the pull step's working directory),
# run as a non-root user. Build: docker build -t bq-refresh:latest .
# The HTTP API beside it, from the same files: docker build --target api -t bq-refresh-api:latest . (below).
FROM python:3.11-slim AS worker

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    BQ_REFRESH_STATE_DIR=/tmp/bq-refresh-state

RUN useradd --create-home --uid 10001 bqrefresh
WORKDIR /opt/bq-refresh

COPY pyproject.toml README.md prefect.yaml ./
COPY bq_refresh ./bq_refresh
COPY blocks ./blocks
COPY tasks ./tasks
COPY flows ./flows
# `.` only, not `.[demo]`: the embedded PostgreSQL, the BigQuery emulator and DuckDB (the demo extra, ~245 MB of
# site-packages) are never imported in production; the image talks to real BigQuery and PostgreSQL.
RUN pip install --compile . && chown -R bqrefresh /opt/bq-refresh

USER bqrefresh
CMD ["bq-refresh", "--help"]

# The HTTP API as a service: docker run -d -p 8080:8080 --env-file .env bq-refresh-api:latest (the worker's
# settings, plus REFRESH_API_TOKEN; with REFRESH_TRIGGER_DEPLOYMENT and PREFECT_API_URL a trigger runs on the
# worker, else in this container). It stops on SIGTERM (docker stop). /healthz answers 200 while the API reaches
# PostgreSQL and 503 otherwise: the health check here, and the probe path for Kubernetes or another orchestrator.
FROM worker AS api
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as r; sys.exit(r.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status != 200)"]
CMD ["bq-refresh", "serve", "--host", "0.0.0.0", "--port", "8080"]

# The default target is the worker image.
FROM worker
