"""``iort-audit verify --witness-key VKEY ... [--quorum N]``: the log's checkpoints must
carry cosignatures by the witnesses the auditor trusts (issue 20; docs/auditors.md).

What is required, and why this rule: the **newest tree checkpoint** of the log that is
cosigned by at least N of the given keys (N = ``--quorum``, default 1; each key counts
once) must exist. The cosignatures are the log's ``witness_cosigned`` entries (the
daemon records each one after checking it, daemon/witnessing.py); each is checked again
here against the given keys, over the text of the log's own ``checkpoint`` entry with
the same size and root. Not "every checkpoint", nor "the last one": the last checkpoint
of a run (its stop) is cosigned only at the next start, and a checkpoint written during a
witness outage is superseded by the next one (a cosignature of size S vouches for every
prefix of it). What follows the newest witnessed checkpoint is reported as not witnessed
(entries and checkpoints), so the auditor sees how much of the log a witness stands
behind.

Exit 1 (printed ``WITNESS: ...``) when no checkpoint reaches the quorum, or when an entry
claims a cosignature by one of the given keys (its name and key ID) that does not verify,
or names a checkpoint the log does not hold: someone with write access to the log
directory can append such an entry (and re-chain the log), but not forge the witness's
signature. Cosignatures by other keys are ignored. A witness vkey is the line
``iort-witness keygen`` printed (``NAME+KEYID+BASE64``), or a file holding it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from iortd.audit.inputs import UsageError
from iortd.auditlog.cosignature import CosignerVerifier, verify_cosignature
from iortd.auditlog.signed_note import NoteError, split_note
from iortd.auditlog.tlog_checkpoint import parse_body
from iortd.kernel.files import FileReadError, read_small_file

__all__ = ["add_arguments", "check_witnessed", "load_witness_keys"]

Say = Callable[[str], None]
_PLACEHOLDER = "origin\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"  # to read a line alone


def add_arguments(v: argparse.ArgumentParser) -> None:
    v.add_argument(
        "--witness-key",
        action="append",
        default=[],
        metavar="VKEY",
        help="a witness's verifier key (the line iort-witness keygen printed, or its .pub "
        "file); repeat for several: the log's checkpoints must carry their cosignatures",
    )
    v.add_argument(
        "--quorum",
        type=int,
        metavar="N",
        help="how many of the --witness-key witnesses must have cosigned (default 1)",
    )


def load_witness_keys(given: Sequence[str], quorum: int | None) -> list[CosignerVerifier]:
    """The keys and quorum from the command line; UsageError naming what is wrong."""
    if quorum is not None and not given:
        raise UsageError("--quorum needs --witness-key (whose cosignatures to count)")
    keys: list[CosignerVerifier] = []
    for text in given:
        try:
            key = CosignerVerifier.parse(_vkey_line(text))
        except NoteError as exc:
            raise UsageError(
                f"--witness-key {text}: {exc}; give the line iort-witness keygen printed"
            ) from None
        if any(k.name == key.name and k.key_id == key.key_id for k in keys):
            raise UsageError(f"--witness-key {key.name}: given twice")
        keys.append(key)
    n = 1 if quorum is None else quorum
    if given and not 1 <= n <= len(keys):
        raise UsageError(f"--quorum {n}: must be 1 .. {len(keys)} (the number of witness keys)")
    return keys


def _vkey_line(text: str) -> str:
    """The vkey itself, or the one line of the file it names (a witness.pub)."""
    path = Path(text)
    if "+" in text and not path.is_file():
        return text
    try:
        return read_small_file(path, 4096).decode("ascii").strip()
    except (FileReadError, OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--witness-key {text}: not a vkey nor a readable file: {exc}") from None


def check_witnessed(
    entries: Iterable[Mapping[str, Any]],
    keys: Sequence[CosignerVerifier],
    quorum: int,
    out: Say,
    err: Say,
) -> bool:
    """Print what the witnesses stand behind; False when the requirement is not met."""
    texts: dict[tuple[int, str], str] = {}  # (size, root) -> the checkpoint's note text
    order: list[tuple[int, str]] = []
    cosigned: dict[tuple[int, str], set[tuple[str, int]]] = {}
    known = {(k.name, k.key_id): k for k in keys}
    ok = True
    last_seq = -1
    for entry in entries:
        last_seq = entry.get("seq", last_seq)
        data = entry.get("data")
        if not isinstance(data, Mapping):
            continue
        if entry.get("type") == "checkpoint" and data.get("tree") and data.get("root"):
            try:
                text, _ = split_note(str(data.get("note", "")), "checkpoint")
                body = parse_body(text)
            except NoteError:  # CheckpointError is one
                continue  # verify_log has judged the checkpoint's note
            # Which checkpoint a cosignature vouches for is what the signed text says
            # (size, root), never the entry's unsigned `count`/`root`: a rewritten tail
            # could otherwise stretch "witnessed" past what the witness saw.
            ident = (body.size, body.root.hex())
            texts[ident] = text
            order.append(ident)
        elif entry.get("type") == "witness_cosigned":
            ok &= _one_cosignature(entry, data, texts, known, cosigned, err)
    names = ", ".join(k.name for k in keys)
    reached = [i for i in order if len(cosigned.get(i, ())) >= quorum]
    if not reached:
        err(
            f"WITNESS: no checkpoint of the log is cosigned by {quorum} of {names} "
            f"({len(order)} tree checkpoint(s) in the log)"
        )
        return False
    size, root = reached[-1]
    later = len(order) - 1 - order.index(reached[-1])
    by = sorted(n for n, _ in cosigned[reached[-1]])
    out(
        f"  witnessed: the checkpoint of size {size} (root {root[:16]}...) is cosigned by "
        f"{len(by)} of {len(keys)} given witness(es) ({', '.join(by)}; quorum {quorum})"
    )
    if later or last_seq + 1 > size:
        out(
            f"  not witnessed yet: entries {size} .. {last_seq} and {later} later "
            "checkpoint(s) (the stop's checkpoint is cosigned at the next start)"
        )
    return ok


def _one_cosignature(
    entry: Mapping[str, Any],
    data: Mapping[str, Any],
    texts: Mapping[tuple[int, str], str],
    known: Mapping[tuple[str, int], CosignerVerifier],
    cosigned: dict[tuple[int, str], set[tuple[str, int]]],
    err: Say,
) -> bool:
    line = str(data.get("cosignature", ""))
    seq = entry.get("seq")
    try:
        ident = (int(data["size"]), str(data["root"]))
    except (KeyError, TypeError, ValueError):
        err(f"WITNESS: entry {seq}: a witness_cosigned entry without size and root")
        return False
    text = texts.get(ident)
    try:
        sigs = split_note(f"{text or _PLACEHOLDER}\n{line}\n", "cosignature")[1]
    except NoteError as exc:
        err(f"WITNESS: entry {seq}: not a cosignature line: {exc}")
        return False
    key = known.get((sigs[0].name, sigs[0].key_id)) if len(sigs) == 1 else None
    if key is None:
        return True  # by a witness key the auditor did not give: ignored
    if text is None:
        err(f"WITNESS: entry {seq}: a cosignature by {key.name} of size {ident[0]} names a "
            "checkpoint the log does not hold before it")  # fmt: skip
        return False
    try:
        verify_cosignature(key, text, line)
    except NoteError as exc:
        err(f"WITNESS: entry {seq}: {exc}")
        return False
    cosigned.setdefault(ident, set()).add((key.name, key.key_id))
    return True
