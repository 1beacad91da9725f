"""One exception hierarchy: every error names the table and the fact that failed."""

from __future__ import annotations

from typing import Any


class RefreshError(Exception):
    """Base of every error bq-refresh raises on purpose.

    Attributes:
        table: the registry name of the table concerned ("schema.table"), if any.
        transient: True when a retry may succeed (network, 5xx, lost connection).
        context: small JSON-able facts for the audit row.
    """

    transient: bool = False

    def __init__(self, message: str, *, table: str | None = None, **context: Any) -> None:
        self.table = table
        self.context = context
        prefix = f"{table}: " if table else ""
        super().__init__(prefix + message)


class ConfigError(RefreshError):
    """A registry entry or setting is invalid; names the table and the key."""


class SourceUnavailable(RefreshError):
    """BigQuery could not be reached or answered with a server error."""

    transient = True


class SourceError(RefreshError):
    """The source exists but cannot be used as configured (missing table or column, bad type)."""


class TargetUnavailable(RefreshError):
    """PostgreSQL could not be reached or dropped the connection."""

    transient = True


class SchemaDriftError(RefreshError):
    """The source schema changed in a way the table's drift policy does not accept."""


class QualityCheckFailed(RefreshError):
    """A hard data-quality check failed; nothing was published."""


class StagingLost(RefreshError):
    """The staging of a run no longer holds what its checkpoint records (PostgreSQL's crash recovery empties
    UNLOGGED tables); nothing was published and the next run starts over."""


class GroupHeld(RefreshError):
    """A member of a publish group could not be published: the whole group keeps its previous data.
    ``table`` and ``context['member']`` name the member that failed, ``context['group']`` the group."""


class DiskBudgetExceeded(RefreshError):
    """A full or initial load would need more disk than REFRESH_DISK_BUDGET_MB leaves; nothing was loaded.
    ``context`` holds need_bytes, headroom_bytes and budget_mb."""


class OverBudget(RefreshError):
    """BigQuery estimates that a table's query or read scans more bytes than its maximum_bytes_billed: refused
    before it runs. ``context`` holds estimate_bytes and limit_bytes."""


class AlreadyRunning(RefreshError):
    """Another refresh of the same table holds its lock."""


class DependencyCycle(RefreshError):
    """The registry's dependencies form a cycle."""


class NightFailed(RefreshError):
    """A night's run ended with failed tables: the message names them, ``summary`` is the night's summary (what
    the run returns when nothing failed), so that a caller of a failed run still reads every table's outcome;
    ``reported``: each failure was delivered to an alert channel."""

    def __init__(self, message: str, *, summary: dict[str, Any] | None = None, reported: bool = False) -> None:
        super().__init__(message)
        self.summary: dict[str, Any] = summary or {}
        self.reported = reported


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry may cure: network, 5xx, deadlines, lost connections, serialization failures.

    Permanent errors (schema drift, failed quality check, invalid config, permission denied) are not.
    """
    if isinstance(exc, RefreshError):
        return exc.transient
    try:
        import psycopg

        if isinstance(exc, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected):
            return True
        if isinstance(exc, psycopg.errors.InsufficientPrivilege):
            return False
        if isinstance(exc, psycopg.OperationalError):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        from google.api_core import exceptions as gexc

        if isinstance(exc, gexc.ServerError | gexc.TooManyRequests | gexc.DeadlineExceeded | gexc.RetryError):
            return True
        if isinstance(exc, gexc.GoogleAPICallError):
            return False
    except ImportError:  # pragma: no cover
        pass
    name = type(exc).__name__
    if "adbc" in type(exc).__module__ and ("OperationalError" in name or "IO" in str(exc)[:40]):
        return True
    return isinstance(exc, ConnectionError | TimeoutError)


class TargetError(RefreshError):
    """PostgreSQL refused an operation (permission denied, statement timeout, constraint)."""


def name_failure(exc: BaseException, table: str) -> BaseException:
    """An error raised by a library, re-said as a RefreshError that names the table and the system.

    RefreshErrors and interruptions (KeyboardInterrupt, cancellation) are returned unchanged.
    """
    if isinstance(exc, RefreshError) or not isinstance(exc, Exception):
        return exc
    module = type(exc).__module__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if module.startswith(("psycopg", "adbc")):
        cls: type[RefreshError] = TargetUnavailable if is_transient(exc) else TargetError
        wrapped: RefreshError = cls(f"PostgreSQL: {text}", table=table, error_type=type(exc).__name__)
    elif module.startswith(("google", "grpc")):
        cls = SourceUnavailable if is_transient(exc) else SourceError
        wrapped = cls(f"BigQuery: {text}", table=table, error_type=type(exc).__name__)
    else:
        wrapped = RefreshError(f"{type(exc).__name__}: {text}", table=table)
    wrapped.__cause__ = exc
    return wrapped
