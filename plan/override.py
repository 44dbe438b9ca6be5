"""``iort-plan override``: a physicist's signed override of named verification mismatches.

    iort-plan override --delivery ID --prescription SHA256 --item ITEM [--item ITEM ...]
                       --reason TEXT --key KEYFILE --holder ID --site S --room R
                       (--broker URL ... | --inbox DIR) [--ttl S]

When the daemon's check of the console against the prescription before beam-on
(docs/prescriptions.md, "Verification before beam-on") finds a mismatch the physicist has
judged acceptable, they override it, by name, with a reason: DICOM's Overridden Parameters
Sequence, and the outcome VERIFIED_OVR. This module builds the ``override`` command's body
and sends it the way ``iort-plan send`` sends (plan/send.py); the daemon's handler judges it
against the delivery it names (built beside this, against exactly this body):

    {"delivery_id": str (1-128 of A-Z a-z 0-9 . _ -, as the delivery topic shows it),
     "prescription_sha256": 64 lower-case hex (the prescription the check was made against),
     "items": [1-8 unique of applicator, applicator_reader, dose, time, time_unchecked],
     "reason": 1-300 printable characters, not only blanks}

Only the items a physicist can judge at the console are overridable; ``no_prescription``,
``signature``, ``expired`` and ``already_delivered`` are not (a prescription that is
missing, unsigned, stale or used is replaced by a new one, never overridden). Naming the
prescription's SHA-256 binds the override to the prescription the physicist looked at: one
that arrives after a new prescription does not carry over to it.

Everything is checked here before anything is signed: an error is one line naming the flag
(exit 2). The reason is recorded in the audit log and shown on the room's topics: never
patient data in it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from iortd.kernel.types import VerificationItem
from iortd.plan import send

__all__ = ["OVERRIDABLE", "OverrideError", "add_parser", "override", "override_body"]

OVERRIDABLE: Final = tuple(
    str(i)
    for i in (
        VerificationItem.APPLICATOR,
        VerificationItem.APPLICATOR_READER,
        VerificationItem.DOSE,
        VerificationItem.TIME,
        VerificationItem.TIME_UNCHECKED,
    )
)
MAX_ITEMS: Final = 8
MAX_REASON: Final = 300
_DELIVERY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


class OverrideError(ValueError):
    """An override body out of bounds; one line naming the flag."""


def override_body(
    delivery_id: str, prescription_sha256: str, items: Sequence[str], reason: str
) -> dict[str, Any]:
    """The ``override`` command's body, after every check (OverrideError otherwise)."""
    if not _DELIVERY_RE.fullmatch(delivery_id):
        raise OverrideError(
            "--delivery: must be the delivery id as the delivery topic shows it "
            "(1-128 of A-Z a-z 0-9 . _ -)"
        )
    if not _SHA_RE.fullmatch(prescription_sha256):
        raise OverrideError(
            "--prescription: must be 64 lower-case hex, the SHA-256 of the prescription the "
            "check named (the verification's prescription_sha256)"
        )
    if not items:
        raise OverrideError(f"--item: give at least one ({', '.join(OVERRIDABLE)})")
    if len(items) > MAX_ITEMS:
        raise OverrideError(f"--item: at most {MAX_ITEMS}")
    seen: list[str] = []
    for item in items:
        if item in seen:
            raise OverrideError(f"--item: {item} given twice")
        if item not in OVERRIDABLE:
            if item in {str(i) for i in VerificationItem}:
                raise OverrideError(
                    f"--item: {item} cannot be overridden (only {', '.join(OVERRIDABLE)}); "
                    "send a new prescription instead"
                )
            known = ", ".join(OVERRIDABLE)
            raise OverrideError(f"--item: {item[:40]} is not a verification item ({known})")
        seen.append(item)
    if not (0 < len(reason) <= MAX_REASON and reason.isprintable() and reason.strip()):
        raise OverrideError(
            f"--reason: must be 1-{MAX_REASON} printable characters on one line, not only "
            "blanks (and never patient data)"
        )
    return {
        "delivery_id": delivery_id,
        "prescription_sha256": prescription_sha256,
        "items": seen,
        "reason": reason,
    }


def add_parser(sub: Any) -> None:
    o = sub.add_parser("override", help="override named verification mismatches (signed)")
    o.add_argument("--delivery", required=True, metavar="ID", help="the delivery id")
    o.add_argument(
        "--prescription", required=True, metavar="SHA256", help="the checked prescription's"
    )
    o.add_argument(
        "--item",
        action="append",
        default=[],
        metavar="ITEM",
        help=f"a mismatch to override, repeatable: {', '.join(OVERRIDABLE)}",
    )
    o.add_argument("--reason", required=True, help="why, in one line (no patient data)")
    send.add_signing_arguments(o)


def _prepare(args: argparse.Namespace, now: datetime) -> send.Outgoing:
    del now  # an override has no date of its own: the envelope's expiry bounds it
    try:
        body: Mapping[str, Any] = override_body(
            args.delivery, args.prescription, args.item, args.reason
        )
    except OverrideError as exc:
        raise send.SendFailed(2, str(exc)) from None
    said = f"override of {', '.join(body['items'])} for delivery {args.delivery}"
    return send.Outgoing("override", body, said)


def override(args: argparse.Namespace) -> str:
    """``iort-plan override``: the line to print. Raises send.SendFailed."""
    return send.send_command(args, _prepare)
