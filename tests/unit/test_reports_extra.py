"""The extra ``reports`` is optional: without it everything but the reports, the DICOM
export and ``send`` works, and those say in one line what to install (audit/extra.py).

One fresh interpreter (this process has long imported the heavy libraries) runs, in order:
``iortd check-config`` and the light ``iort-audit`` commands (keygen, verify, show,
deliveries, export csv/json) on the committed golden log, checking that none of reportlab,
matplotlib, pydicom or pynetdicom was imported; then, with an import blocker for those in
``sys.meta_path`` (as if the extra were not installed), ``report`` (PDF, HTML),
``export --format dicom`` and ``send``, which must exit 2 with the install command and
write or send nothing.
tests/integration/test_install_wheel_venv.py checks the same in a venv built without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "golden-log"
DELIVERY = "or-5-20261206T035245018711Z"
HEAVY = ("reportlab", "matplotlib", "pydicom", "pynetdicom")
INSTALL = "pip install 'iortd[reports]'"

SCRIPT = r"""
import contextlib, io, json, sys
from importlib.abc import MetaPathFinder

plan = json.loads(sys.argv[1])
heavy = tuple(plan["heavy"])


def loaded():
    return sorted({m.partition(".")[0] for m in sys.modules} & set(heavy))


def run(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return {"rc": rc, "out": out.getvalue(), "err": err.getvalue()}


result = {}
from iortd.daemon.cli import main as iortd_main

result["check-config"] = run(iortd_main, ["check-config", plan["config"]])
result["loaded after the daemon"] = loaded()
from iortd.audit.cli import main as audit_main

for name, argv in plan["light"].items():
    result[name] = run(audit_main, argv)
result["loaded after the light commands"] = loaded()


class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in heavy:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
for name, argv in plan["needs_extra"].items():
    result[name] = run(audit_main, argv)
print(json.dumps(result))
"""


def _run(tmp_path: Path) -> dict[str, Any]:
    log = str(FIXTURE / "log")
    site = tmp_path / "site.toml"  # iort-audit send's destination (nobody listens there)
    site.write_text(
        f'[log]\ndirectory = "{log}"\n[[sinks]]\ntype = "dicom"\n[sinks.options]\n'
        'calling_ae = "IORTD_T"\n[[sinks.options.destinations]]\nname = "ois"\n'
        'ae_title = "OIS"\nhost = "127.0.0.1"\nport = 9\n'
    )
    common = [log, "--delivery", DELIVERY, "--pubkey", str(FIXTURE / "or-9.pub")]
    plan = {
        "heavy": HEAVY,
        "config": str(ROOT / "config" / "demo.toml"),
        "light": {
            "keygen": ["keygen", "--name", "t", "--out", str(tmp_path / "keys")],
            "verify": ["verify", log, "--pubkey", str(FIXTURE / "or-9.pub")],
            "show": ["show", log, "--delivery", DELIVERY],
            "deliveries": ["deliveries", log],
            "csv": ["export", *common, "--format", "csv", "--out", str(tmp_path / "a.csv")],
            "json": ["export", *common, "--format", "json", "--out", str(tmp_path / "a.json")],
        },
        "needs_extra": {
            "report pdf": ["report", *common, "--out", str(tmp_path / "r.pdf")],
            "report html": ["report", *common, "--out", str(tmp_path / "r.html")],
            "dicom": ["export", *common, "--format", "dicom", "--out", str(tmp_path / "r.dcm")],
            "send": ["send", "--delivery", DELIVERY, "--to", "ois", "--config", str(site)],
        },
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(plan)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_without_the_extra_only_report_and_dicom_refuse_and_say_what_to_install(
    tmp_path: Path,
) -> None:
    result = _run(tmp_path)
    assert result["check-config"]["rc"] == 0, result["check-config"]
    assert result["loaded after the daemon"] == [], "the daemon imports a library of the extra"
    for name in ("keygen", "verify", "show", "deliveries", "csv", "json"):
        assert result[name]["rc"] == 0, (name, result[name])
    assert result["loaded after the light commands"] == [], (
        "a command that does not need the extra imported one of its libraries"
    )
    assert (tmp_path / "a.csv").stat().st_size > 0
    assert (tmp_path / "a.json").stat().st_size > 0

    for name, command, out in (
        ("report pdf", "iort-audit report", "r.pdf"),
        ("report html", "iort-audit report", "r.html"),
        ("dicom", "iort-audit export --format dicom", "r.dcm"),
        ("send", "iort-audit send", "nothing.sent"),
    ):
        got = result[name]
        assert got["rc"] == 2, (name, got)
        lines = got["err"].splitlines()
        assert len(lines) == 1, (name, got["err"])
        assert lines[0].startswith(f"iort-audit: {command} needs "), lines[0]
        assert any(f"needs {lib}," in lines[0] for lib in HEAVY), lines[0]
        assert INSTALL in lines[0], lines[0]
        assert got["out"] == "", "refused before reading the log"
        assert not (tmp_path / out).exists()
