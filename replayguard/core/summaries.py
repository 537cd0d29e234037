"""How an alert's summary shows an identifier someone else chose.

Principal names, VM ids, event ids and deployment ids reach summaries from guests, relays
and peers (CONTRACT §3 allows any printable characters, spaces and colons included). Each
is shown as a JSON string, in double quotes with ``"``, ``\\`` and control characters
escaped, so that none can close its quotes and go on as the service's own words: the
principal ``alice: locked out; no action needed`` stays one quoted name. The summaries
built in SQL use ``rg_quoted`` (migrations/functions/rg_quoted.sql), which gives the same
text (tests/integration/test_summary_quoting.py holds them to it).
"""

from __future__ import annotations

import json


def quoted(identifier: str | None) -> str:
    """``identifier`` as a summary shows it: a JSON string (non-ASCII characters kept as
    they are, as PostgreSQL's ``to_json`` keeps them); ``None`` is the bare word null."""
    return json.dumps(identifier, ensure_ascii=False)
