"""The C2SP tlog-checkpoint body (c2sp.org/tlog-checkpoint) over the Merkle tree, its
strict parser, and the signed checkpoint it becomes.

The body of every tree checkpoint and seal the writer signs (note.py's ``Checkpoint``
writes it through :class:`CheckpointBody` and reads it through :func:`parse_body`; its
line 4 is iortd's ``head <hex>`` extension: docs/audit-log.md, "Signed checkpoints").
What a witness needs is only lines 1 to 3. It imports nothing of note.py (note.py reads
through it): the keys are the protocols below.

A body is, each line ending in a newline (U+000A) and none of them empty:

1. the **origin**: non-empty (C2SP: SHOULD be a schema-less URL without spaces or '+';
   iortd's is ``iortd/<site>/<room>/<random hex>``, logdir.new_origin);
2. the **tree size**: ASCII decimal, no sign, no leading zero (``0`` for the empty tree);
   an unsigned 64-bit integer;
3. the **root hash**: standard base64 (RFC 4648 §4, with padding) of the 32-byte RFC 6962
   root at that size (merkle.py), in its one canonical spelling;
4. optional **extension lines**, opaque, non-empty.

:func:`parse_body` refuses anything else, naming the line: a second spelling of the same
checkpoint (``012``, ``+12``, non-ASCII digits, base64 with stray bits or without padding,
``\\r\\n``) would let two different texts, and two signatures, stand for one tree head.
The signed-note rules apply on top (no control character but the newline: signed_note.py).

:func:`sign_checkpoint` composes the signed note exactly as note.py signs today's
checkpoints (``Signer.sign``: the body, a blank line, ``— <name> <base64(key ID ||
Ed25519 signature)>``); :func:`open_checkpoint` verifies the note by C2SP signed-note's
rules first (signed_note.open_note: unknown signatures such as witnesses' cosignatures are
ignored) and only then parses its text, since an unverified text must be ignored.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar

from iortd.auditlog.merkle import HASH_SIZE
from iortd.auditlog.signed_note import NoteError, NoteVerifier, open_note

__all__ = ["CheckpointBody", "CheckpointError", "open_checkpoint", "parse_body", "sign_checkpoint"]

MAX_SIZE: Final = 2**64 - 1
_DIGITS: Final = frozenset("0123456789")


V = TypeVar("V", bound=NoteVerifier)


class NoteSigner(Protocol):
    """What signing needs of a key (note.py's ``Signer``; not imported: note.py reads
    tree checkpoints through this module)."""

    def sign(self, text: str) -> str: ...


class CheckpointError(NoteError):
    """A checkpoint body that is not exactly C2SP's form; says which line and why."""


def _check_line(line: str, what: str) -> None:
    if not line:
        raise CheckpointError(f"checkpoint: {what} is empty")
    if "\n" in line:
        raise CheckpointError(f"checkpoint: {what} holds a newline")
    for c in line:
        if c < " ":
            raise CheckpointError(f"checkpoint: {what} holds the control character {c!r}")


@dataclass(frozen=True, slots=True)
class CheckpointBody:
    origin: str
    size: int
    root: bytes  # the RFC 6962 root at ``size``
    extensions: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """The note text; CheckpointError if it cannot be written in C2SP's form."""
        _check_line(self.origin, "the origin (line 1)")
        if not 0 <= self.size <= MAX_SIZE:
            raise CheckpointError(f"checkpoint: tree size {self.size} is not 0 .. 2^64-1")
        if len(self.root) != HASH_SIZE:
            raise CheckpointError(f"checkpoint: the root hash is {len(self.root)} bytes, not 32")
        for i, ext in enumerate(self.extensions, start=4):
            _check_line(ext, f"extension line {i}")
        root = base64.b64encode(self.root).decode("ascii")
        return "".join(f"{x}\n" for x in (self.origin, str(self.size), root, *self.extensions))


def parse_body(text: str) -> CheckpointBody:
    """A checkpoint body by C2SP's rules, strictly; CheckpointError naming the line."""
    if not text.endswith("\n"):
        raise CheckpointError("checkpoint: the text must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise CheckpointError(
            "checkpoint: needs at least three lines (origin, tree size, root hash), "
            f"has {len(lines)}"
        )
    origin, size_s, root_s, *ext = lines
    _check_line(origin, "the origin (line 1)")
    for i, ext_line in enumerate(ext, start=4):
        _check_line(ext_line, f"line {i}")
    if (
        not size_s
        or not set(size_s) <= _DIGITS
        or (size_s != "0" and size_s[0] == "0")
        or int(size_s) > MAX_SIZE
    ):
        raise CheckpointError(
            f"checkpoint: the tree size (line 2) {size_s!r} is not a decimal 0 .. 2^64-1 "
            "without sign or leading zero"
        )
    try:
        root = base64.b64decode(root_s, validate=True)
        canonical = base64.b64encode(root).decode("ascii") == root_s
    except (ValueError, binascii.Error):
        canonical = False
        root = b""
    if not canonical or len(root) != HASH_SIZE:
        raise CheckpointError(
            f"checkpoint: the root hash (line 3) {root_s[:60]!r} is not the standard base64 "
            "of 32 bytes"
        )
    return CheckpointBody(origin, int(size_s), root, tuple(ext))


def sign_checkpoint(body: CheckpointBody, signer: NoteSigner) -> str:
    """The signed checkpoint note, as note.py signs (one Ed25519 signature line)."""
    return signer.sign(body.text)


def open_checkpoint(
    note: str | bytes, verifiers: Sequence[V]
) -> tuple[CheckpointBody, tuple[V, ...]]:
    """Verify a signed checkpoint (signed_note.open_note: at least one known signature,
    every known one valid, unknown ones ignored), then parse its body strictly. Returns
    the body and the verifiers whose signatures verified."""
    opened = open_note(note, verifiers)
    return parse_body(opened.text), opened.verified
