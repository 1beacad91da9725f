# bq-refresh worker image: the project installed at /opt/bq-refresh (the pull step's working directory),
# run as a non-root user. Build: docker build -t bq-refresh:latest .
FROM python:3.11-slim

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
