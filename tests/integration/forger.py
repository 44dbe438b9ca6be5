"""What someone with write access to a log directory, and no signing key, can do to it:
rewrite entries and re-chain them by the published rules, append chained entries, cut
the log, put an older copy back, delete the seal and checkpoint files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from iortd.auditlog.verify import collect_files

Entry = dict[str, Any]


def entries(log_dir: Path) -> list[Entry]:
    return [
        orjson.loads(line) for f in collect_files([log_dir]) for line in f.read_bytes().splitlines()
    ]


def line_of(entry: Entry, prev: str) -> tuple[bytes, str]:
    """The entry re-chained after ``prev``: (its line, its hash)."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    body["prev"] = prev
    digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return orjson.dumps({**body, "hash": digest}, option=orjson.OPT_SORT_KEYS) + b"\n", digest


def rewrite_from(log_dir: Path, first_seq: int, edit: Callable[[Entry], Entry]) -> int:
    """Edit every entry from ``first_seq`` on (in the newest segment) and re-chain them:
    returns how many were changed."""
    seg = collect_files([log_dir])[-1]
    out: list[bytes] = []
    prev: str | None = None
    changed = 0
    for raw in seg.read_bytes().splitlines():
        e = orjson.loads(raw)
        if e["seq"] < first_seq:
            out.append(raw + b"\n")
            prev = e["hash"]
            continue
        assert prev is not None, "the rewrite starts inside the newest segment"
        new = edit(e)
        changed += new != e
        line, prev = line_of(new, prev)
        out.append(line)
    seg.write_bytes(b"".join(out))
    return changed


def append(log_dir: Path, *new: Entry) -> list[int]:
    """Append entries chained after the head (seq, prev, ts, mono_ns filled in)."""
    seg = collect_files([log_dir])[-1]
    last = orjson.loads(seg.read_bytes().splitlines()[-1])
    seqs = []
    with open(seg, "ab") as f:
        for e in new:
            body = {
                **e,
                "seq": last["seq"] + 1,
                "ts": last["ts"],
                "mono_ns": last["mono_ns"] + 1000,
            }
            line, digest = line_of(body, last["hash"])
            f.write(line)
            last = {**body, "hash": digest}
            seqs.append(body["seq"])
    return seqs


def halve_doses(e: Entry) -> Entry:
    if e["type"] != "sample":
        return e
    d = dict(e["data"])
    for k in ("dose_primary_gy", "dose_secondary_gy", "delivered_primary_gy"):
        if isinstance(d.get(k), int | float):
            d[k] = d[k] / 2
    return {**e, "data": d}
