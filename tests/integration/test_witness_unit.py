"""The witness's systemd unit (deploy/systemd/iort-witness.service), linted as far as a
machine without systemd as PID 1 allows: ``systemd-analyze verify`` on a copy whose
ExecStart points at this venv's ``iort-witness``, and its sandbox scored by
``systemd-analyze security --offline`` (bounded, so that a dropped hardening line shows).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from daemonproc import BIN

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "iort-witness.service"
ANALYZE = shutil.which("systemd-analyze")
MAX_EXPOSURE_TENTHS = 20  # as the room daemon's unit (test_systemd_unit.py)


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (Debian: systemd)")
def test_witness_unit_passes_verify_and_its_sandbox_scores_low(tmp_path: Path) -> None:
    assert ANALYZE is not None
    text = UNIT.read_text(encoding="utf-8")
    assert text.count("ExecStart=/opt/iortd/bin/iort-witness serve ") == 1
    unit = tmp_path / "iort-witness.service"
    unit.write_text(text.replace("/opt/iortd/bin/iort-witness", str(BIN / "iort-witness")), "utf-8")
    verify = subprocess.run(
        [ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")
    security = subprocess.run(
        [ANALYZE, "security", "--offline=yes", f"--threshold={MAX_EXPOSURE_TENTHS}", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert security.returncode == 0, security.stdout[-600:]
    # Exit 2 (a configuration error) is not restarted; anything else is.
    assert "RestartPreventExitStatus=2" in text
