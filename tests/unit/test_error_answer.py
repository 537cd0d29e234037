"""What a handler's error becomes: the contract's error body, 503 for a database that will
not take a session now, 500 with no detail only for the unexpected."""

from __future__ import annotations

import asyncpg
import pytest

from replayguard.errors import InvalidRequest
from replayguard.http.app import error_answer


@pytest.mark.parametrize("exc", [
    asyncpg.ObjectNotInPrerequisiteStateError('database "rg" is not currently accepting connections'),
    asyncpg.InvalidCatalogNameError('database "rg" does not exist'),
    asyncpg.InvalidPasswordError('password authentication failed for user "rg"'),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    ConnectionRefusedError(111, "Connection refused"),
])
def test_a_database_that_takes_no_session_now_is_503_unavailable(exc: Exception) -> None:
    """A server that refuses a new session (closed to sessions, renamed away by a restore,
    authentication changed, starting up) or cannot be reached: 503 ``unavailable``, whatever
    handler met it, and the server's words are not echoed."""
    status, body = error_answer(exc)
    assert status == 503 and isinstance(body["error"], dict) and body["error"]["code"] == "unavailable", body
    assert "rg" not in str(body)


def test_a_client_error_says_its_own_and_anything_else_is_a_bare_500() -> None:
    """A ``ReplayGuardError`` keeps its status and body; an unexpected error is 500 ``internal``
    with no detail."""
    assert error_answer(InvalidRequest("bad", field="x"))[0] == 400
    status, body = error_answer(RuntimeError("secret detail"))
    assert status == 500 and body == {"error": {"code": "internal", "message": "internal error"}}
