"""A command's answer: the words people read and the fields a program matches on.

Every answer to a command (a handler's verdict, the intake's refusal, a failure) goes out
as a notice, ``notice(severity, text)`` (daemon/service.py), to every sink. Its words may
quote what a sender chose (a refusal's detail), so a program waiting for its command's
verdict (the dashboard, dashboard/commanding.py) must never decide from them: anyone who
may publish on a command topic can make a refusal's words say anything.

So an answer's text is an :class:`Answered`: a ``str`` (the console, the operational
log and any plug-in sink read the same words as before, through the same ``notice``
path, unchanged) that also carries :attr:`Answered.command`, the structured answer. The
MQTT sink publishes it as the ``command`` object of the ``daemon_notice``
(docs/mqtt-topics.md); a notice that answers no command has no ``command``:

* ``kind``: the kind of the command judged; null for the intake's refusal (the
  envelope was not accepted, so its kind is only the sender's word);
* ``nonce``: of the command judged (signed, accepted); null for the intake's refusal;
* ``sha256``: for the intake's refusal, the SHA-256 of the bytes received (a sender knows
  its own bytes: the verdict is about them, whatever they claim); null otherwise;
* ``outcome``: ``done`` (recorded, in force), ``refused`` (judged and refused: nothing
  changed) or ``failed`` (accepted, but the handler failed: not carried out);
* ``reason``: a fixed word (the intake's reject reason, the handler's refusal reason, a
  failure's exception class), never a sender's text; null when done.

Only the daemon's code makes one; nothing of a sender's text becomes a field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal, get_args

__all__ = ["OUTCOMES", "Answered", "Outcome", "answered"]

Outcome = Literal["done", "refused", "failed"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)  # the schema's enum
_REASON_RE = re.compile(r"[A-Za-z0-9_]{1,64}")  # as the schema says


class Answered(str):
    """A notice's text that answers a command; :attr:`command` is the structured answer."""

    __slots__ = ("command",)
    command: Mapping[str, Any]


def answered(
    text: str,
    outcome: Outcome,
    *,
    kind: str | None = None,
    nonce: str | None = None,
    sha256: str | None = None,
    reason: str | None = None,
) -> Answered:
    """``text`` as the answer ``outcome`` to the command ``kind``/``nonce`` (a handler's)
    or to the bytes hashing to ``sha256`` (the intake's refusal)."""
    said = Answered(text)
    said.command = MappingProxyType(
        {
            "kind": kind,
            "nonce": nonce,
            "sha256": sha256,
            "outcome": outcome,
            "reason": None if reason is None else _word(reason),
        }
    )
    return said


def _word(reason: str) -> str:
    """A fixed word as the schema takes it ("other" if a handler's reason is not one)."""
    return reason if _REASON_RE.fullmatch(reason) else "other"
