"""Signed commands made for a logged-in user, for the dashboard (issue 19, items 3-4).

The dashboard may import ``users`` but not the audit-log core (tests/unit/test_layers.py),
so the one call it needs from it, :func:`iortd.auditlog.command.sign_command`, is reached
through here: the user's key was opened by :func:`iortd.users.unlock` at login and the
envelope is the one every sender makes (docs/commands.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from iortd.auditlog.command import sign_command
from iortd.auditlog.note import Signer

__all__ = ["signed_command"]


def signed_command(
    kind: str,
    body: Mapping[str, Any],
    *,
    signer: Signer,
    holder: str,
    site: str,
    room: str,
    ttl_s: float,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The signed envelope of a ``kind`` command (ValueError for what no daemon accepts)."""
    return sign_command(
        kind, body, signer=signer, holder=holder, site=site, room=room, ttl_s=ttl_s, now=now
    )
