"""``iort-audit verify``'s check of the physicists' sign-offs (``delivery_signed`` entries).

For every ``delivery_signed`` entry (daemon/signoff.py; what is signed: auditlog/signoff.py):

1. the entry's own fields agree with the signed envelope it carries (delivery id, meaning,
   reason, printed name, holder, signing time, record, nonce; the envelope's kind is
   ``signoff``): an entry edited after the fact fails here even where the chain is redone;
2. the signed record is the delivery's range as the log holds it, recomputed from the
   entries *before* the sign-off (:func:`~iortd.auditlog.signoff.delivery_record`): the
   delivery has ended, and the first and last seq, the SHA-256 of the entries' hashes and
   the covering checkpoint are equal. A signature moved to another delivery, or a delivery
   whose entries were changed, fails here, naming the sign-off entry;
3. with a keyring (``--keyring``): the envelope's Ed25519 signature was made by a key of
   its holder enrolled with the physicist role and valid at the signing time, and the
   printed name is the keyring's for that key. Without a keyring the signatures are not
   checked and the caller says so as a warning, never as a pass.

A finding names the entry (``seq N: delivery_signed ...``); the caller exits 1 on any.
Reads the log's entries twice, whatever the number of sign-offs: once to find them, once
to rebuild every signed delivery's range up to each of its sign-offs (a builder per signed
delivery, from its first entry to its last sign-off); the entries are never all held in
memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iortd.audit.record import DeliveryRecord
from iortd.audit.review import load_entries
from iortd.auditlog.keyring import Keyring
from iortd.auditlog.signoff import DeliveryRange, RangeBuilder, SignoffError, check_envelope
from iortd.auditlog.verify import collect_files

__all__ = ["SignoffCheck", "attach_verdicts", "check_signoffs", "describe", "verify_signoffs"]

# an entry's field -> (where in the envelope, its key there)
_AGREE = (
    ("delivery_id", "body", "delivery_id"),
    ("meaning", "body", "meaning"),
    ("reason", "body", "reason"),
    ("name", "body", "name"),
    ("record", "body", "record"),
    ("utc_offset_min", "body", "utc_offset_min"),
    ("by", "", "signer"),
    ("signed_at", "", "issued_at"),
    ("nonce", "", "nonce"),
)


@dataclass(frozen=True, slots=True)
class SignoffCheck:
    signed: int  # delivery_signed entries found
    problems: tuple[str, ...]  # each names the entry
    signatures_checked: bool  # a keyring was given and every signature was checked
    verdicts: dict[int, str | None]  # each sign-off's finding by its seq; None: no finding


def _fields(e: Mapping[str, Any]) -> str | None:
    d = e.get("data")
    env = d.get("envelope") if isinstance(d, dict) else None
    if not (isinstance(d, dict) and isinstance(env, dict) and isinstance(env.get("body"), dict)):
        return "carries no signed envelope"
    if env.get("kind") != "signoff":
        return f"its envelope is a {str(env.get('kind'))[:32]!r} command, not a sign-off"
    for key, part, there in _AGREE:
        if d.get(key) != (env["body"] if part else env).get(there):
            return f"its {key} is not what the signed envelope says"
    return None


def _did(e: Mapping[str, Any]) -> str | None:
    d = e.get("data")
    did = d.get("delivery_id") if isinstance(d, dict) else None
    return did if isinstance(did, str) else None


def _ranges(
    entries: Iterable[Mapping[str, Any]], signed: list[Mapping[str, Any]]
) -> dict[int, DeliveryRange | str | None]:
    """Each sign-off's delivery range as the entries before it give it (or why it cannot
    be computed), in ONE pass over the log: a builder per signed delivery, fed from its
    first entry to its last sign-off only."""
    until: dict[str, int] = {}
    for e in signed:
        did, seq = _did(e), e.get("seq")
        if did is not None and isinstance(seq, int):
            until[did] = max(until.get(did, -1), seq)
    builders = {did: RangeBuilder(did) for did in until}
    broken: dict[str, str] = {}
    out: dict[int, DeliveryRange | str | None] = {}
    for e in entries:
        seq = e.get("seq")
        if not isinstance(seq, int):
            continue
        did = _did(e) if e.get("type") == "delivery_signed" else None
        if did is not None and did in until and seq <= until[did]:
            out[seq] = broken.get(did) or builders[did].result()  # the entries before it
        for name in [n for n, last in until.items() if seq >= last]:
            del until[name]  # past its last sign-off: no longer followed
            builders.pop(name, None)
        for name, b in builders.items():
            try:
                b.feed(e)
            except SignoffError as exc:
                broken.setdefault(name, exc.detail)
    return out


def _one(
    e: Mapping[str, Any], got: DeliveryRange | str | None, keyring: Keyring | None
) -> str | None:
    problem = _fields(e)
    if problem is not None:
        return problem
    d = e["data"]
    did = d["delivery_id"]
    if not isinstance(did, str):
        return "names no delivery"
    if isinstance(got, str):
        return f"delivery {did}'s range cannot be recomputed: {got}"
    if got is None:
        return f"delivery {did} has no entries before it"
    if not got.ended:
        return f"delivery {did} had not ended when it was signed"
    record = got.record()
    if record != d["record"]:
        signed = d["record"] if isinstance(d["record"], dict) else {}
        field = next(
            (k for k in ("first_seq", "last_seq", "entries_sha256", "checkpoint")
             if (record or {}).get(k) != signed.get(k)),
            "record",
        )  # fmt: skip
        return (
            f"the signed record is not delivery {did}'s as the log holds it ({field} differs: "
            "moved to another delivery, or the delivery's entries changed)"
        )
    if keyring is None:
        return None
    try:
        key = check_envelope(d["envelope"], keyring)
    except SignoffError as exc:
        return f"signature not valid ({exc.reason}): {exc.detail}"
    if key.name != d["name"]:
        return f"its printed name is not the keyring's for {key.holder} ({key.name!r})"
    return None


def attach_verdicts(rec: DeliveryRecord, paths: Sequence[Path], keyring: Keyring) -> None:
    """``iort-audit report --keyring``: each of the delivery's sign-offs checked, for the
    report's "signature valid" (audit/report/signoffs.py)."""
    files = collect_files(paths)
    rec.signoff_verdicts = check_signoffs(lambda: load_entries(files), keyring).verdicts


def check_signoffs(
    entries: Callable[[], Iterable[Mapping[str, Any]]], keyring: Keyring | None
) -> SignoffCheck:
    """Every ``delivery_signed`` entry of the log checked; ``entries`` gives a fresh pass
    over the log's whole entries in seq order each time it is called."""
    signed = [e for e in entries() if e.get("type") == "delivery_signed"]
    ranges = _ranges(entries(), signed) if signed else {}
    problems = []
    verdicts: dict[int, str | None] = {}
    first_of: dict[str, Any] = {}  # nonce -> the seq that recorded it first
    for e in signed:
        seq = e.get("seq")
        got = ranges.get(seq) if isinstance(seq, int) else None
        problem = _one(e, got, keyring) if isinstance(seq, int) else "has no seq"
        nonce = str(e["data"].get("nonce")) if problem is None else ""
        if nonce in first_of:  # one signed command is one act: recorded once
            problem = f"the same signed command was recorded at seq {first_of[nonce]} already"
        elif nonce:
            first_of[nonce] = seq
        verdicts[seq if isinstance(seq, int) else -1] = problem
        if problem is not None:
            did = e.get("data", {}).get("delivery_id") if isinstance(e.get("data"), dict) else None
            problems.append(f"seq {e.get('seq')}: delivery_signed (delivery {did}): {problem}")
    return SignoffCheck(len(signed), tuple(problems), keyring is not None, verdicts)


def describe(check: SignoffCheck) -> tuple[list[str], list[str]]:
    """(lines for the output, warnings) that ``iort-audit verify`` prints for ``check``."""
    if not check.signed:
        return [], []
    out = [f"SIGN-OFF NOT VALID: {p}" for p in check.problems]
    n = f"{check.signed} sign-off{'s' if check.signed != 1 else ''}"
    if not check.signatures_checked:
        out.append(f"  {n}: records checked; signatures NOT checked (no --keyring)")
        return out, ["sign-offs not checked: no keyring (pass --keyring FILE)"]
    good = check.signed - len(check.problems)
    out.append(f"  {n}: {good} signature(s) valid against the keyring, bound to their records")
    return out, []


def verify_signoffs(
    files: Sequence[Path],
    keyring: Keyring | None,
    out: Callable[[str], None],
    err: Callable[[str], None],
) -> bool:
    """``iort-audit verify``'s part: the findings to ``out``, warnings (each prefixed) to
    ``err``; False when a sign-off does not check (exit 1)."""
    check = check_signoffs(lambda: load_entries(files), keyring)
    lines, warnings = describe(check)
    for w in warnings:
        err(f"warning: {w}")
    for line in lines:
        out(line)
    return not check.problems
