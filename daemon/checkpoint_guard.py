"""The guard on the broker's retained checkpoint: the MQTT sink asks, before it overwrites
the off-host copy of this log's checkpoint, whether this log contains it.

A retained checkpoint signed by our key that covers more entries than this log has, or
differs from it at its last entry, means this log was replaced or rewritten (a restored
backup, a fork): the conflict is recorded (``checkpoint_publish_refused``) and alarmed, and
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
    elif await audit.hash_at(cp.count - 1) != cp.head_hash:
        why = (
            f"the broker's retained checkpoint differs from this log at seq "
            f"{cp.count - 1}: the log was replaced or rewritten (a fork)"
        )
    else:
        return None
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
