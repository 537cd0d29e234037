"""DecideItem: the decision the service hands to rg_decide, and its wire form."""

from __future__ import annotations

import re
from importlib import resources

from replayguard.core.decide_item import DecideItem
from replayguard.core.decisions import Reason
from replayguard.core.receipts import ReceiptStatus


def _recordset_columns() -> set[str]:
    sql = resources.files("replayguard.migrations.functions").joinpath("rg_decide.sql").read_text()
    assert "jsonb_populate_recordset(NULL::rg_decide_item, p_items)" in sql  # the batch is decoded into the type
    block = re.search(r"CREATE TYPE rg_decide_item AS \((.*?)\);", sql, re.S)
    assert block is not None
    return {column.split()[0] for column in block.group(1).split(",")}


FULL = DecideItem(
    kind="otp", ts_us=1, vm_id="web-01", subject="alice", payload={"context": {}},
    receipt=ReceiptStatus.VALID, receipt_vm_id="web-01", receipt_seq=7, receipt_request=b"\x02",
    receipt_unanswered=b"\x03", preset_reason=Reason.NO_TOKEN,
    expires_us=9, digest=b"\x01", token_id="otp_x", credential="ab", steps=(5, 6),
    step_digests={5: b"\x05", 6: b"\x06"}, replay_only=True, period_s=30, drift_steps=1, clock_scope="cg")


def test_every_field_is_a_column_rg_decide_reads() -> None:
    """The wire form of an item with every field set has exactly the fields of rg_decide_item, the
    type rg_decide.sql decodes the batch into."""
    assert set(FULL.to_wire()) == _recordset_columns()


def test_the_wire_form_leaves_out_what_is_absent_and_spells_values() -> None:
    """Absent fields are left out; enums travel as their values, bytes as hex, steps' digests keyed by text."""
    nonce = DecideItem(kind="nonce", ts_us=2, vm_id="v", subject="scope", payload={"ttl_s": 5}, digest=b"\xab")
    assert nonce.to_wire() == {"kind": "nonce", "ts_us": 2, "vm_id": "v", "subject": "scope",
                               "payload": {"ttl_s": 5}, "receipt": "absent", "digest": "ab"}
    wire = FULL.to_wire()
    assert (wire["receipt"], wire["preset_reason"]) == ("valid", "no_token")
    assert wire["steps"] == [5, 6] and wire["step_digests"] == {"5": "05", "6": "06"}


def test_every_value_of_a_full_item_travels() -> None:
    """Each field of an item with every field set reaches the wire with its own value, not
    only its name: the whole wire form, written out."""
    assert FULL.to_wire() == {
        "kind": "otp", "ts_us": 1, "vm_id": "web-01", "subject": "alice", "payload": {"context": {}},
        "receipt": "valid", "receipt_vm_id": "web-01", "receipt_seq": 7, "receipt_request": "02",
        "receipt_unanswered": "03", "preset_reason": "no_token",
        "expires_us": 9, "digest": "01", "token_id": "otp_x", "credential": "ab", "steps": [5, 6],
        "step_digests": {"5": "05", "6": "06"}, "replay_only": True, "period_s": 30, "drift_steps": 1,
        "clock_scope": "cg"}
