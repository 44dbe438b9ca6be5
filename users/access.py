"""The access record: every dashboard login, failed login, logout and session end.

An audit-log directory of its own, ``DIR/access`` beside the account record (``DIR/record``):
the account record replays *changes to the store* and every entry in it must be signed by an
admin (record.py), which a failed login from an unknown person cannot be; mixing the two
would break that replay. So the dashboard keeps one long-lived writer here (auditlog/writer.py,
origin ``iort-dashboard``), and ``iort-audit verify DIR/access`` checks its chain like any log.

Entries (``data``):

====================  ===================================================================
``login``             ``holder``, ``roles``, ``client``, ``by_key`` and ``sig``: the user's
                      own key signs the entry's data and the previous entry's hash (as
                      record.py does), so a login cannot be written in without the password
``login_failed``      ``holder`` when it names an account, else null (a string typed into the
                      id field may be a password), ``account`` (``known``/``unknown``),
                      ``client``
``login_refused``     ``holder``, ``reason`` (``password_change_required``), ``client``
``logout``            ``holder``, ``client``
``session_ended``     ``holder``, ``reason`` (``idle``, ``absolute``, ``evicted``,
                      ``account_inactive``, ``store_unusable``, ``stopped``,
                      ``signoff_password_failed``), ``age_s``
====================  ===================================================================

Never a password, a hash, a session id, a CSRF token or a key. Sessions live in the
dashboard's memory only: a ``login`` with no later ``logout`` or ``session_ended`` for it
means the dashboard was killed (a clean stop writes ``session_ended``, ``stopped``, for
each). The client is the address the dashboard saw (a proxy's, behind one).
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

from iortd.auditlog.note import Signer
from iortd.auditlog.writer import AuditLog
from iortd.users.record import signed_message

__all__ = ["ACCESS_DIR", "ACCESS_TYPES", "AccessRecord", "AccessRecordError"]

ACCESS_DIR = "access"
ORIGIN = "iort-dashboard"
ACCESS_TYPES = frozenset({"login", "login_failed", "login_refused", "logout", "session_ended"})
COMMIT_TIMEOUT_S = 10.0


class AccessRecordError(Exception):
    """The access record cannot be opened or written; the message names the directory."""


class AccessRecord:
    """One writer for the dashboard's lifetime: :meth:`open`, :meth:`run` in a task,
    :meth:`append` per event, :meth:`close` at the stop."""

    def __init__(self, log: AuditLog, directory: Path) -> None:
        self._log = log
        self.directory = directory

    @classmethod
    async def open(cls, directory: Path) -> AccessRecord:
        try:
            log, _ = await AuditLog.open(directory, origin=ORIGIN, group_commit_s=0.01)
        except OSError as exc:
            raise AccessRecordError(
                f"{directory}: cannot open the access record ({exc}); is another "
                "iort-dashboard using this account store?"
            ) from None
        return cls(log, directory)

    async def run(self) -> None:
        await self._log.run()

    async def append(self, type: str, data: dict[str, Any], signer: Signer | None = None) -> None:
        """Append one entry and wait until it is on disk (AccessRecordError if it is not
        within COMMIT_TIMEOUT_S: the caller refuses what it was about to allow)."""
        if type not in ACCESS_TYPES:
            raise ValueError(f"not an access event: {type}")
        if signer is not None:
            _seq, prev = self._log.head
            data = {**data, "by_key": f"{signer.key_hash:08x}"}
            sig = signer.private_key.sign(signed_message(type, data, prev))
            data["sig"] = base64.b64encode(sig).decode("ascii")
        try:
            entry = self._log.append(type, data, durable=True)
            await asyncio.wait_for(entry.committed, timeout=COMMIT_TIMEOUT_S)
        except (OSError, TimeoutError, RuntimeError) as exc:
            raise AccessRecordError(
                f"{self.directory}: cannot write the access record: {exc}"
            ) from None

    async def close(self) -> None:
        await self._log.close()
