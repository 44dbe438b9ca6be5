"""What an auditor hands ``iort-audit`` besides the log: the daemon's public key
(``--pubkey``) and checkpoints kept off the host (``--checkpoint``).

Each is read as a small regular file (kernel/files.py) and checked before the log is
read; anything wrong with one is a :class:`UsageError` naming the option, the file and what
is wrong (exit status 2). A held checkpoint is either the signed note itself (the log
directory's ``checkpoint`` file) or the JSON payload saved from the ``audit/checkpoint``
topic; it counts only if it is signed by ``--pubkey``, and all of them must be of one log.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from iortd.auditlog.note import Checkpoint, NoteError, Verifier
from iortd.kernel.files import FileReadError, read_small_file

__all__ = ["UsageError", "checkpoint_notes", "held_checkpoints", "load_pubkey"]


class UsageError(Exception):
    """A command-line input that cannot be used (exit status 2); the message says which."""


def checkpoint_notes(text: str, where: Path) -> str:
    """The signed note in a saved checkpoint: the note itself (the log directory's
    ``checkpoint`` file) or the JSON payload of the ``audit/checkpoint`` topic
    (docs/schemas/v1/checkpoint.schema.json), whose ``note`` is the note verbatim."""
    if not text.lstrip().startswith("{"):
        return text
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise UsageError(f"--checkpoint {where}: not a note nor JSON: {exc}") from None
    note = payload.get("note") if isinstance(payload, dict) else None
    if not isinstance(note, str):
        raise UsageError(
            f"--checkpoint {where}: JSON without a 'note' string: expected the payload of "
            "the audit/checkpoint topic"
        )
    try:
        cp, _ = Checkpoint.parse_verified(note, None)
    except NoteError as exc:
        raise UsageError(f"--checkpoint {where}: note: {exc}") from None
    # The parsed fields are for display; if they disagree with the note, someone edited one.
    shown = {k: payload.get(k) for k in ("origin", "count", "head") if k in payload}
    actual = {"origin": cp.origin, "count": cp.count, "head": cp.head_hash}
    if bad := [k for k, v in shown.items() if v != actual[k]]:
        raise UsageError(
            f"--checkpoint {where}: the payload's {', '.join(bad)} differ from its signed note"
        )
    return note


def held_checkpoints(path: Path, pubkey: Verifier) -> list[str]:
    """Every note held in ``path``: a file, or a directory of files (each a note or a
    saved payload), each signed by ``pubkey`` and all of one log."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        if not files:
            raise UsageError(f"--checkpoint {path}: the directory holds no checkpoints")
    else:
        files = [path]
    notes = []
    origins = set()
    for f in files:
        try:
            text = read_small_file(f, expected="a saved checkpoint file").decode("utf-8")
        except FileReadError as exc:
            raise UsageError(f"--checkpoint {f}: {exc.reason}") from None
        except UnicodeDecodeError:
            raise UsageError(f"--checkpoint {f}: not UTF-8 text") from None
        note = checkpoint_notes(text, f)
        try:
            cp, signed = Checkpoint.parse_verified(note, pubkey)
        except NoteError as exc:
            raise UsageError(f"--checkpoint {f}: {exc}") from None
        if not signed:
            raise UsageError(f"--checkpoint {f}: not signed by --pubkey ({pubkey.name})")
        notes.append(note)
        origins.add(cp.origin)
    if len(origins) > 1:
        raise UsageError(
            f"--checkpoint {path}: holds checkpoints of {len(origins)} logs "
            f"({', '.join(sorted(origins))}); give those of this log only"
        )
    return notes


def load_pubkey(path: Path) -> Verifier:
    try:
        text = read_small_file(path, 64 * 1024, expected="a public key file").decode("ascii")
        return Verifier.parse(text)
    except FileReadError as exc:
        raise UsageError(f"--pubkey {path}: {exc.reason}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--pubkey {path}: not a public key (not ASCII text)") from None
    except NoteError as exc:
        raise UsageError(f"--pubkey {path}: {exc}") from None
