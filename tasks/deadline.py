"""One deadline for a BigQuery that does not answer: BIGQUERY_TIMEOUT_SECONDS bounds Google's retries, ours and
Prefect's together instead of each layer multiplying the others'.

The layers, and how each spends the one budget (``Budget``):

- Google's clients. A gRPC call (the Storage Read API) given ``timeout=T`` gets a deadline T for all its retries
  (google-api-core's ``TimeToDeadlineTimeout``); a REST call (tables, datasets, jobs) is retried under
  ``short_retry(T)`` until T, each request waiting up to its own timeout.
- Ours. The preflight of ``bq-refresh run`` calls with short attempts (``Budget.attempt_s``) until the budget is
  spent, so a black hole (a port that accepts and never answers) shows its first error within ``FIRST_ERROR_S``
  rather than after the whole budget.
- Prefect's task retries. An error after which BigQuery has given no answer for the whole budget (Google's retry
  gave up at its deadline, a call's deadline passed, the connection was refused or timed out) is not retried by
  Prefect (``spent``): a retry would only wait the budget out again. An error BigQuery answered quickly (a stream
  cut mid-read, a 503 while reading) is still retried: the next attempt resumes from the checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import google.auth.exceptions
import requests
from google.api_core import exceptions as gexc

from bq_refresh.errors import SourceUnavailable, is_transient

DEFAULT_BUDGET_S = 60.0  # BIGQUERY_TIMEOUT_SECONDS' default (bq_refresh/settings.py)
FIRST_ERROR_S = 15.0  # an unreachable BigQuery is reported at the latest this long after the first call
ATTEMPT_S = 10.0  # one call's longest wait in our own retries: below FIRST_ERROR_S with room for the backoff
BACKOFF_S = (0.5, 1.0, 2.0, 4.0)  # between our attempts; the last repeats

# What "no answer" looks like from the clients: the call never got a reply, or Google's retry gave up at its deadline.
NO_ANSWER: tuple[type[BaseException], ...] = (
    gexc.RetryError, gexc.DeadlineExceeded, requests.exceptions.Timeout, requests.exceptions.ConnectionError,
    google.auth.exceptions.TransportError, TimeoutError, ConnectionError,
)
# Errors that are BigQuery's answer (a 5xx, a 429): a retry that gave up on these was answered every time (a 503 or
# quota storm), not left without an answer; Prefect retries it. DeadlineExceeded is a 504 but means no answer.
ANSWERED: tuple[type[BaseException], ...] = (gexc.ServerError, gexc.TooManyRequests)
# What our own retries try again: no answer, or a server error (5xx, 429).
RETRIED: tuple[type[BaseException], ...] = (*NO_ANSWER, gexc.ServerError, gexc.TooManyRequests, OSError)

T = TypeVar("T")


@dataclass
class Budget:
    """The time left to reach BigQuery, from the moment it is made."""

    total_s: float
    started: float = field(default_factory=time.monotonic)

    @property
    def remaining_s(self) -> float:
        return max(0.0, self.started + self.total_s - time.monotonic())

    @property
    def attempt_s(self) -> float:
        """The timeout of one attempt: short enough that the first error shows early, never past the budget."""
        return max(0.1, min(ATTEMPT_S, self.remaining_s))

    @property
    def reports_first_error(self) -> bool:
        """A budget longer than FIRST_ERROR_S ends too late to be the first word: the first error is said before."""
        return self.total_s > FIRST_ERROR_S


def call_within(budget: Budget, call: Callable[[float], T], *,
                on_first_error: Callable[[BaseException], None] | None = None) -> T:
    """Call ``call(timeout)`` until it answers or the budget is spent, each attempt at most ``budget.attempt_s``.

    Raises:
        The last error of ``RETRIED`` when the budget is spent; any other error at once.
    """
    failures = 0
    while True:
        try:
            return call(budget.attempt_s)
        except RETRIED as exc:
            pause = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
            failures += 1
            if failures == 1 and on_first_error is not None and budget.reports_first_error:
                on_first_error(exc)
            if budget.remaining_s <= pause:
                raise
            time.sleep(pause)


def worth_retrying(exc: BaseException) -> bool:
    """Prefect's retry condition for the refresh's tasks: errors a retry may cure (``is_transient``), except those
    after which BigQuery gave no answer for the whole budget (``spent``)."""
    return is_transient(exc) and not spent(exc)


def spent(exc: BaseException) -> bool:
    """True when BigQuery gave no answer for the whole budget behind ``exc``: a ``SourceUnavailable`` raised from
    (``raise ... from None`` keeps it as ``__context__``) one of ``NO_ANSWER``, or a bare client error of
    ``NO_ANSWER`` from Google's clients. A PostgreSQL error is never BigQuery's. A read stream that stalls after
    rows came (extract.read_stream's watchdog) is retried: the next attempt resumes from the checkpoint."""
    if isinstance(exc, SourceUnavailable):
        seen: BaseException | None = exc.__cause__ or exc.__context__
        for _ in range(8):  # a chain is short; never loop on a cycle
            if seen is None:
                return False
            if isinstance(seen, NO_ANSWER):
                return _unanswered(seen)
            seen = seen.__cause__ or seen.__context__
        return False
    return (isinstance(exc, gexc.RetryError | gexc.DeadlineExceeded | requests.exceptions.RequestException)
            and _unanswered(exc))


def _unanswered(exc: BaseException) -> bool:
    """A RetryError whose last error was BigQuery's answer (5xx, 429) was answered: not spent."""
    if isinstance(exc, gexc.RetryError):
        last = exc.cause
        return not (isinstance(last, ANSWERED) and not isinstance(last, gexc.DeadlineExceeded))
    return True
