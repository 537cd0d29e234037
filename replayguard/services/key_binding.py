"""The keys a database was set up with, held to at every start (migration 032).

The first process that opens a database with keys records a keyed check of the pepper
and of the secret key (an HMAC of a fixed label: it says nothing of the key); every later
process must give the same checks. Other keys on a used database would mean a ledger
whose digests no longer match anything presented (every code and nonce already used
accepted again) and token secrets that no longer decrypt, so such a start is refused with
one line that names where the keys came from.
"""

from __future__ import annotations

import hashlib
import hmac

import asyncpg

from ..errors import ConfigError
from ..keys import Keys
from ..pg.connections import acquire

_LABEL = b"replayguard key binding v1"


def checks(keys: Keys) -> tuple[bytes, bytes]:
    """The checks of the pepper and of the secret key, as the database records them."""
    return (hmac.new(keys.pepper, _LABEL, hashlib.sha256).digest(),
            hmac.new(keys.secret, _LABEL, hashlib.sha256).digest())


async def hold_to_binding(pool: asyncpg.Pool, keys: Keys, now_us: int, where: str) -> None:
    """Records these keys' checks on a database that has none; raises ``ConfigError`` when
    the database was set up with other keys. ``where`` names the keys for the message."""
    pepper_check, secret_check = checks(keys)
    async with acquire(pool) as conn:
        await conn.execute("INSERT INTO key_binding (pepper_check, secret_check, bound_us) VALUES ($1, $2, $3)"
                           " ON CONFLICT (id) DO NOTHING", pepper_check, secret_check, now_us)
        row = await conn.fetchrow("SELECT pepper_check, secret_check FROM key_binding")
    assert row is not None  # noqa: S101 - the row was just inserted, or was there
    differ = [name for name, mine, theirs in (("pepper", pepper_check, row["pepper_check"]),
                                              ("secret key", secret_check, row["secret_check"]))
              if not hmac.compare_digest(mine, bytes(theirs))]
    if differ:
        raise ConfigError(
            f"the keys in {where} are not the ones this database was set up with (the {' and the '.join(differ)}"
            f" differ{'s' if len(differ) == 1 else ''}): start with the data dir (or key files) it was set up with;"
            " with other keys every code and nonce already used would be accepted again")
