"""The protected store: the identifiers the hospital hand-off needs, kept apart.

A prescription, its file, the audit log, the topics and every log carry pseudonyms only.
Where the hospital's systems need to find the treatment again (the real Patient ID, the RT
Plan's SOP Instance UID), ``iort-plan import --protected-store DIR`` writes them here, keyed
by the pseudonymous treatment id, and nowhere else:

- ``DIR`` is a directory of mode 0700 owned by the user running the tool (created so when
  missing; an existing one that is a link, someone else's, or open to group or others is
  refused, naming ``chmod 700``), one JSON file per treatment id, ``<treatment_id>.json``,
  mode 0600, written atomically (a new file created exclusively without following links,
  fsync'd, renamed into place, the directory fsync'd): a crash leaves the old entry or the
  new, never half of one.
- An entry is never overwritten with another plan's identifiers: a treatment id names one
  treatment, so a second import for it with a different Patient ID or plan UID is refused
  (exit 1); the same plan again changes nothing.
- Nothing here prints, logs or puts a value in an error message: errors name the store and
  the treatment id (a pseudonym), never what is stored.

Who may read it is the hospital's business (file permissions, the host's backups); the point
is that nothing else iortd writes needs it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import orjson

from iortd.kernel.durable import fsync_dir, write_all

__all__ = ["HandOff", "StoreConflict", "StoreError", "save_hand_off"]


class StoreError(Exception):
    """The store cannot be used as it is (a usage problem: exit 2)."""


class StoreConflict(Exception):
    """The treatment id already holds another plan's identifiers (exit 1)."""


@dataclass(frozen=True, slots=True)
class HandOff:
    treatment_id: str  # pseudonym: the key, and the file's name
    plan_id: str  # pseudonym
    patient_id: str  # identifying: only ever here
    plan_sop_instance_uid: str  # identifying (links to the patient's plan): only ever here


def _open_dir(root: Path) -> None:
    try:
        root.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"--protected-store {root}: cannot create it: {exc.strerror}") from None
    st = os.lstat(root)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"--protected-store {root}: not a directory (a link is refused)")
    if st.st_uid != os.geteuid():
        raise StoreError(f"--protected-store {root}: owned by another user; use your own")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise StoreError(
            f"--protected-store {root}: open to group or others "
            f"({stat.S_IMODE(st.st_mode):o}); restrict it: chmod 700 {root}"
        )


def save_hand_off(root: Path, entry: HandOff, stored_at: str) -> Path:
    """Write ``entry`` under ``root`` (see the module's rules); the entry's path."""
    _open_dir(root)
    path = root / f"{entry.treatment_id}.json"
    try:
        old = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        old = None
    except (OSError, orjson.JSONDecodeError):
        raise StoreError(
            f"--protected-store {root}: the entry for {entry.treatment_id} cannot be read; "
            "look at it by hand"
        ) from None
    if isinstance(old, dict):
        if (old.get("patient_id"), old.get("plan_sop_instance_uid")) == (
            entry.patient_id,
            entry.plan_sop_instance_uid,
        ):
            return path  # the same plan imported again
        raise StoreConflict(
            f"the protected store already holds another plan for treatment id "
            f"{entry.treatment_id}; a treatment id names one treatment: choose a new one"
        )
    data = orjson.dumps(
        {
            "v": 1,
            "treatment_id": entry.treatment_id,
            "plan_id": entry.plan_id,
            "patient_id": entry.patient_id,
            "plan_sop_instance_uid": entry.plan_sop_instance_uid,
            "stored_at": stored_at,
        },
        option=orjson.OPT_SORT_KEYS,
    )
    tmp = root / f".{entry.treatment_id}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            write_all(fd, data + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
        fsync_dir(root)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StoreError(f"--protected-store {root}: cannot write: {exc.strerror}") from None
    return path
