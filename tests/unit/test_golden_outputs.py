"""The auditors' outputs of a committed log are byte-identical to what they were.

``tests/fixtures/golden-log`` is a real log (the daemon recording a door-interrupted delivery
from ``iort-sim``; tests/integration/reportlogs.py made it) with its public key, and
``outputs.sha256`` the digests of every export and both reports that ``iort-audit`` wrote for
it before the redesign of issue 15. Restructuring must not change a byte of what an auditor
gets. An intended change of output (a new field, a new version number in the report: the
package version is printed in every report) updates the digests in the same commit and is
listed in CHANGELOG.md.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from iortd.audit import cli

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "golden-log"
DELIVERY = "or-5-20261206T035245018711Z"
OUTPUTS = {
    "csv.csv": ("export", "--format", "csv"),
    "events.csv": ("export", "--format", "csv", "--table", "events"),
    "json.json": ("export", "--format", "json"),
    "dicom.dcm": ("export", "--format", "dicom"),
    "report.pdf": ("report",),
    "report.html": ("report",),
}


def _expected() -> dict[str, str]:
    out = {}
    for line in (FIXTURE / "outputs.sha256").read_text("utf-8").splitlines():
        if line and not line.startswith("#"):
            digest, name = line.split()
            out[name] = digest
    return out


def test_every_output_is_listed() -> None:
    assert set(_expected()) == set(OUTPUTS)


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_output_is_byte_identical(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command, *args = OUTPUTS[name]
    out = tmp_path / name
    argv = [command, str(FIXTURE / "log"), "--delivery", DELIVERY]
    argv += ["--pubkey", str(FIXTURE / "or-9.pub"), *args, "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert digest == _expected()[name], (
        f"iort-audit {command} {' '.join(args)} no longer writes what it wrote for the committed "
        f"log ({out}); if the change is intended, update {FIXTURE / 'outputs.sha256'} and "
        "CHANGELOG.md"
    )
