"""bq-refresh's own log records (the standard library's loggers of tasks/, flows/, blocks/, bq_refresh/) logged
inside a Prefect flow or task run reach that run's log, so the UI shows them beside get_run_logger's lines: Prefect
attaches its API handler only to its own loggers (and to PREFECT_LOGGING_EXTRA_LOGGERS, which a deployment would
have to set). Their level is left as it is: warnings and errors (Python's default) reach the run log."""

from __future__ import annotations

import logging
import sys
from typing import Any

from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler

from bq_refresh.redact import redact

OUR_LOGGERS = ("tasks", "flows", "blocks", "bq_refresh")


class RunLogHandler(APILogHandler):
    """Prefect's API log handler for our loggers. A record logged outside a run (a command line command, or a thread
    that does not carry the run's context) is left to the console alone instead of a warning; a known secret in a
    message is redacted before it leaves the process."""

    def prepare(self, record: logging.LogRecord) -> dict[str, Any]:
        log = super().prepare(record)
        log["message"] = redact(str(log.get("message", "")))
        return log

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's naming
        if isinstance(sys.exc_info()[1], MissingContextError):
            return
        super().handleError(record)


def attach() -> None:
    """Add the handler to our loggers once per process."""
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, RunLogHandler) for h in logger.handlers):
            logger.addHandler(RunLogHandler())
