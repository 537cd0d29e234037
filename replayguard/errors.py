"""The one exception hierarchy of replayguard.

Every error a client can cause is a subclass of ``ClientError`` with a stable ``code``
and HTTP ``status``; the HTTP layer renders them once, as CONTRACT §3's error body.
``Unavailable`` is the fail-closed answer when the ledger cannot be written.
"""

from __future__ import annotations


class ReplayGuardError(Exception):
    """Root of every error replayguard raises on purpose."""

    code = "internal"
    status = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def body(self) -> dict[str, object]:
        """The contract's error body for this error."""
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


class ConfigError(ReplayGuardError):
    """Bad configuration found at start-up; the CLI prints it as one line and exits."""

    code = "config"


class ClientError(ReplayGuardError):
    """An error caused by the request; always a 4xx."""

    code = "invalid_request"
    status = 400


class InvalidRequest(ClientError):
    code = "invalid_request"
    status = 400


class Unauthorized(ClientError):
    code = "unauthorized"
    status = 401


class Forbidden(ClientError):
    code = "forbidden"
    status = 403


class NotFound(ClientError):
    code = "not_found"
    status = 404


class MethodNotAllowed(ClientError):
    code = "method_not_allowed"
    status = 405


class Conflict(ClientError):
    code = "conflict"
    status = 409


class RequestTimeout(ClientError):
    code = "request_timeout"
    status = 408


class PayloadTooLarge(ClientError):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(ClientError):
    code = "unsupported_media_type"
    status = 415


class TooManyRequests(ClientError):
    code = "too_many_requests"
    status = 429


class Unavailable(ReplayGuardError):
    """The ledger (or another dependency a decision needs) cannot be used: fail closed."""

    code = "unavailable"
    status = 503


class LedgerRollback(Unavailable):
    """The ledger went back in time (CONTRACT §10): no decision is served until the
    recovery is recorded with ``replayguard ledger accept-rollback``."""

    code = "ledger_rollback"
