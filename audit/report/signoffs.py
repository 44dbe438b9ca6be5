"""The report's sign-off section: each physicist's electronic sign-off of the delivery, or
the paper sign-off box when there is none.

One row per ``delivery_signed`` entry naming the delivery (daemon/signoff.py), in the log's
order (a later sign-off never replaces an earlier one: reviewed, then approved, or a second
physicist): the printed name and holder id, the meaning (and the reason of an approval with
deviation), the signing time in UTC and in the signing station's local time (the UTC
offset the signature covers; "not recorded" without one), and the signature's status:

* "valid (checked against the keyring)" only when ``iort-audit report --keyring`` ran the
  checks ``iort-audit verify --keyring`` makes (audit/signoffs.py) and they passed;
* "NOT VALID: ..." with the finding when they failed;
* "not checked (no --keyring)" otherwise: never shown as valid without the check.

The paper box ("Reviewed by / Signature / Date") stays only when the log holds no
electronic sign-off of the delivery: a printed report of a signed delivery is not signed
again by hand, and a paper signature beside an electronic one would be two records of
one act.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from iortd.audit.record import DeliveryRecord
from iortd.audit.report.model import Block, Heading, Para, SignOff, Table, parse_ts, when
from iortd.auditlog.signoff import MEANING_TEXT

__all__ = ["signoff_blocks"]


def _local(ts: Any, offset: Any) -> str:
    at = parse_ts(ts)
    if at is None or type(offset) is not int:
        return "not recorded"
    local = at + timedelta(minutes=offset)
    sign = "+" if offset >= 0 else "-"
    hours, minutes = divmod(abs(offset), 60)
    return f"{local:%Y-%m-%d %H:%M:%S} (UTC{sign}{hours:02d}:{minutes:02d}, signing station)"


def _status(rec: DeliveryRecord, seq: int) -> str:
    verdicts = rec.signoff_verdicts
    if verdicts is None:
        return "not checked (no --keyring)"
    problem = verdicts.get(seq, "not checked")
    return "valid (checked against the keyring)" if problem is None else f"NOT VALID: {problem}"


def signoff_blocks(rec: DeliveryRecord) -> list[Block]:
    """The section: a table of the electronic sign-offs, or the paper box without any."""
    if not rec.signoffs:
        return [SignOff()]
    rows = []
    for e in rec.signoffs:
        d = e["data"]
        meaning = MEANING_TEXT.get(str(d.get("meaning")), str(d.get("meaning")))
        if d.get("reason"):
            meaning += f": {d['reason']}"
        rows.append(
            [
                str(d.get("name")),
                str(d.get("by")),
                meaning,
                when(d.get("signed_at")),
                _local(d.get("signed_at"), d.get("utc_offset_min")),
                _status(rec, int(e["seq"])),
            ]
        )
    return [
        Heading("Electronic sign-off"),
        Table(
            ["Printed name", "Holder", "Meaning", "Signed (UTC)", "Signed (local)", "Signature"],
            rows,
            [0.17, 0.12, 0.2, 0.17, 0.17, 0.17],
        ),
        Para(
            "Each sign-off is an Ed25519 signature by the physicist's enrolled key over the "
            "delivery's record (its entries' hashes and the covering signed checkpoint), "
            "recorded as an entry of the hash chain. To re-check: iort-audit verify LOGDIR "
            "--keyring KEYRING.toml.",
            "note",
        ),
    ]
