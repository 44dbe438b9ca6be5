"""The log holds no patient-identifying field: identifiers are pseudonymous codes."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from daemonproc import BIN

from iortd.auditlog.verify import collect_files

pytestmark = pytest.mark.integration

# Field names that would carry a person's identity if anything ever wrote them.
IDENTIFYING = re.compile(r"patient|surname|given_name|birth|dob|mrn|medical_record|address|phone")


def keys(value: Any, path: str = "") -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield f"{path}.{k}"
            yield from keys(v, f"{path}.{k}")
    elif isinstance(value, list):
        for v in value:
            yield from keys(v, path)


def test_no_identifying_field_and_pseudonymous_delivery_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home"))
    log = tmp_path / "log"
    p = subprocess.run(
        [str(BIN / "iortd"), "demo", "--speed", "1200", "--log-dir", str(log)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    files = collect_files([log])
    assert all(re.fullmatch(r"log-\d{16}-\d{8}\.jsonl", f.name) for f in files)
    entries = [orjson.loads(line) for f in files for line in f.read_bytes().splitlines()]
    assert entries
    for e in entries:
        bad = [k for k in keys(e) if IDENTIFYING.search(k.lower())]
        assert not bad, f"seq {e['seq']}: identifying field(s) {bad}"
        did = e.get("delivery_id")
        if did is not None:
            # room slug + start time: nothing a person could be recognised by
            assert re.fullmatch(r"[a-z0-9-]+-\d{8}T\d{12}Z(-\d+)?", did), did
