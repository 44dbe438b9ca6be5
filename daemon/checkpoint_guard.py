"""The guard on the broker's retained checkpoint: the MQTT sink asks, before it overwrites
the off-host copy of this log's checkpoint, whether this log contains it.

A retained checkpoint signed by our key that covers more entries than this log has, or
differs from it at its last entry, means this log was replaced or rewritten (a restored
backup, a fork); one whose last entry this log can no longer show (deleted by retention,
the archive unreachable or not chaining) cannot be compared and is treated the same way,
in its own words: the conflict is recorded (``checkpoint_publish_refused``) and alarmed, and
the sink keeps the off-host copy. Moved out of daemon/service.py unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from iortd.auditlog.note import Checkpoint
from iortd.auditlog.writer import AuditLog, AuditLogClosed

__all__ = ["guard_checkpoint"]


async def guard_checkpoint(
    audit: AuditLog, cp: Checkpoint, notice: Callable[[str, str], None]
) -> str | None:
    """Why this log does not contain ``cp`` (the broker's retained checkpoint, signed
    by our key), or None. A conflict is recorded and alarmed: the sink will not
    overwrite the off-host copy with this log's checkpoints."""
    if cp.origin != audit.origin or cp.count == 0:
        return None
    have = audit.committed_seq + 1
    if cp.count > have:
        why = (
            f"the broker's retained checkpoint covers {cp.count} entries, this log has "
            f"{have}: this log is behind it (a restored backup or a replaced log)"
        )
    else:
        ours = await audit.hash_at(cp.count - 1)
        if ours == cp.head_hash:
            return None
        if ours is None:
            # The entry is no longer here (retention moved it) and the archive could not
            # vouch for it: no archive configured, the share unreadable or hung, or its
            # copy not chained to this log (auditlog/marker.py). Not overwriting the
            # off-host copy is the safe side either way; the words must not say "fork".
            why = (
                f"this log cannot show its entry at seq {cp.count - 1} to compare with the "
                "broker's retained checkpoint (deleted locally, and the archive is not "
                "configured, not readable or does not chain to this log)"
            )
        else:
            why = (
                f"the broker's retained checkpoint differs from this log at seq "
                f"{cp.count - 1}: the log was replaced or rewritten (a fork)"
            )
    found = {
        "why": why,
        "broker_count": cp.count,
        "broker_head": cp.head_hash,
        "log_count": have,
    }
    with contextlib.suppress(AuditLogClosed):
        audit.append("checkpoint_publish_refused", found, durable=True)
    notice(
        "critical",
        f"audit checkpoint NOT published: {why}. The off-host copy is kept; check "
        "this log with iort-audit verify --checkpoint",
    )
    return why
