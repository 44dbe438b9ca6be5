"""What ``iort-audit`` reads besides the log for issue 18's outputs: the protected store's
hand-off entry (``export --format dicom --store DIR``) and the keyring's printed names
(``report --keyring FILE``).

The protected store is written by ``iort-plan import --protected-store DIR`` (plan/store.py,
whose format this reads: ``DIR/<treatment_id>.json``, ``{"v": 1, "treatment_id", "plan_id",
"patient_id", "plan_sop_instance_uid", "stored_at"}``; tests/unit/test_rx_cli.py writes one
with plan/store.py and reads it back here). It holds the real Patient ID and the RT Plan's
SOP Instance UID: they go into the DICOM object handed to the hospital and nowhere else.
So the same rules as for writing it hold for reading: the directory is the user's own, not
a link and closed to group and others; the entry is a regular file (a link is not
followed) closed to group and others; anything else is refused (exit 2) and nothing is
written. No message here prints a value from the store: errors name the store and the
treatment id (a pseudonym) only.

The keyring (auditlog/keyring.py) gives the report the printed names of the staff a check
names, and whether each held the role the act needed when it was done; no key is used.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import orjson

from iortd.audit.inputs import UsageError
from iortd.auditlog.keyring import Keyring, KeyringError, load_keyring

__all__ = ["MAX_ENTRY_BYTES", "load_report_keyring", "read_hand_off"]

MAX_ENTRY_BYTES = 64 * 1024
_PSEUDONYM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # plan/model.py's pseudonym
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def load_report_keyring(path: Path) -> Keyring:
    """The keyring at ``path`` (UsageError, listing every problem, if unusable)."""
    try:
        return load_keyring(path)
    except KeyringError as exc:
        raise UsageError(f"--keyring: {exc}") from None


def _closed(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not stat.S_IMODE(st.st_mode) & 0o077


def read_hand_off(store: Path, treatment_id: str) -> dict[str, str]:
    """``{"patient_id", "plan_sop_instance_uid"}`` for ``treatment_id`` (UsageError if the
    store or the entry cannot be used; the message never holds a stored value)."""
    where = f"--store {store}"
    if not _PSEUDONYM.fullmatch(treatment_id) or treatment_id.isdigit():
        raise UsageError(f"{where}: the delivery's treatment id is not a pseudonym; no entry")
    try:
        st = os.lstat(store)
    except OSError as exc:
        raise UsageError(f"{where}: cannot be read: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{where}: not a directory (a link is refused)")
    if not _closed(st):
        raise UsageError(
            f"{where}: not your own directory closed to group and others; it holds patient "
            f"identifiers: chmod 700 {store}"
        )
    path = store / f"{treatment_id}.json"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UsageError(
            f"{where}: no entry for treatment id {treatment_id} (iort-plan import "
            "--protected-store writes it when the plan is imported)"
        ) from None
    except OSError as exc:
        raise UsageError(
            f"{where}: the entry for {treatment_id} cannot be read ({exc.strerror}; a link "
            "is refused)"
        ) from None
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode):
            raise UsageError(f"{where}: the entry for {treatment_id} is not a regular file")
        if not _closed(fst):
            raise UsageError(
                f"{where}: the entry for {treatment_id} is not yours or is open to group or "
                f"others: chmod 600 {path}"
            )
        raw = os.read(fd, MAX_ENTRY_BYTES + 1)
    finally:
        os.close(fd)
    try:
        doc = orjson.loads(raw) if len(raw) <= MAX_ENTRY_BYTES else None
    except orjson.JSONDecodeError:
        doc = None
    pid = doc.get("patient_id") if isinstance(doc, dict) else None
    uid = doc.get("plan_sop_instance_uid") if isinstance(doc, dict) else None
    if (
        not isinstance(doc, dict)
        or doc.get("v") != 1
        or doc.get("treatment_id") != treatment_id
        or not isinstance(pid, str)
        or not 0 < len(pid) <= 64
        or not pid.isprintable()
        or "\\" in pid
        or not isinstance(uid, str)
        or len(uid) > 64
        or not _UID.fullmatch(uid)
    ):
        raise UsageError(
            f"{where}: the entry for {treatment_id} is not a protected-store entry of format 1 "
            "for that treatment id (look at it by hand)"
        )
    return {"patient_id": pid, "plan_sop_instance_uid": uid}
