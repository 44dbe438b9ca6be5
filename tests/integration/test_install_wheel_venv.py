"""The distribution as a user installs it: a wheel in a fresh virtual environment.

Builds the wheels of iortd and of the example third-party driver
(examples/iortd-driver-example) from a copy of the working tree, as a clean clone has it,
installs both into a new venv, and checks what the issue's "Done when" asks:

- nothing generic lands in site-packages: the wheel holds only ``iortd/`` and its
  dist-info, and ``daemon``, ``drivers``, ``simulators``, ``dashboard``, ``config``,
  ``iort_config`` and ``iort_schemas`` do not import;
- the installed package finds its data (bundled configs, profiles, the JSON Schemas)
  without the source tree;
- ``iortd check-config`` finds the example driver through the ``iort.drivers`` entry
  point: a config naming it validates, and a bad option is reported with its key;
- ``pip install python-daemon`` (whose import name is ``daemon``) beside it breaks
  neither;
- without the extra ``reports`` (reportlab, matplotlib, pydicom are left out of the venv):
  ``iortd check-config`` imports none of them, ``iort-audit verify`` of the committed golden
  log works, and ``iort-audit report`` exits 2 with the command that installs the extra.

This is the one test that builds a venv (marker ``venv``). It is bounded: the wheels
are built by pip with build isolation (setuptools from pip's cache or index), the venv
has no pip of its own (the outer pip installs into it with ``--python``), and iortd's
runtime dependencies come from the test run's own environment through a ``.pth`` file
that points at a filtered view of its site-packages (everything but iortd's editable
install), so only python-daemon and lockfile are downloaded (or taken from pip's cache).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.venv]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "iortd-driver-example"
BUDGET_S = 60
GENERIC = ("daemon", "drivers", "simulators", "dashboard", "config", "iort_config", "iort_schemas")
REPORTS_EXTRA = ("reportlab", "matplotlib", "pydicom")  # pyproject: optional-dependencies
GOLDEN = Path("tests", "fixtures", "golden-log")
GOLDEN_DELIVERY = "or-5-20261206T035245018711Z"


def _run(argv: list[str], *, cwd: Path, deadline: float, env: dict[str, str] | None = None) -> str:
    left = deadline - time.monotonic()
    assert left > 0, f"over the {BUDGET_S} s budget before running {argv[:4]}"
    proc = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=left, check=False
    )
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def _clean_clone(dest: Path) -> None:
    """The tracked (and new, not ignored) files of the working tree, symlinks as links."""
    git = shutil.which("git")
    assert git is not None, "git is needed to list the working tree"
    listed = subprocess.run(
        [git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.split(b"\0")
    archive = dest.with_suffix(".tar")
    with tarfile.open(archive, "w") as tar:
        for name in filter(None, (n.decode() for n in listed)):
            if (ROOT / name).exists() or (ROOT / name).is_symlink():
                tar.add(ROOT / name, arcname=name, recursive=False)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="tar")


def _extra_entries() -> set[str]:
    """The site-packages entries of the extra's distributions (their packages, modules and
    dist-info): the venv is built as a user gets it without the extra."""
    out: set[str] = set()
    for name in REPORTS_EXTRA:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not in this environment either: nothing to leave out
        for file in dist.files or ():
            top = file.parts[0]
            if top not in ("..", "__pycache__"):
                out.add(top)
    return out


def _dependencies_view(view: Path) -> None:
    """This environment's site-packages without iortd itself (its editable install) and
    without the extra ``reports``."""
    view.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    left_out = _extra_entries()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("iortd", "__editable__", "_iortd")) or name.endswith(".pth"):
            continue
        if entry.name in left_out:
            continue
        (view / entry.name).symlink_to(entry)


def test_wheel_in_fresh_venv_has_one_namespace_and_finds_the_example_driver(
    tmp_path: Path,
) -> None:
    deadline = time.monotonic() + BUDGET_S
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]

    tree = tmp_path / "clone"
    _clean_clone(tree)
    wheels = tmp_path / "wheels"
    _run(
        [
            *pip,
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(wheels),
            str(tree),
            str(tree / "examples" / "iortd-driver-example"),
        ],
        cwd=tmp_path,
        deadline=deadline,
    )
    (wheel,) = wheels.glob("iortd-*.whl")
    (example_wheel,) = wheels.glob("iortd_driver_example-*.whl")

    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert {n.split("/")[0] for n in names} == {"iortd", wheel.name.split("-py3")[0] + ".dist-info"}
    for data in (
        "iortd/config/demo.toml",
        "iortd/config/profiles/intrabeam.toml",
        "iortd/schemas/v1/telemetry.schema.json",
        "iortd/py.typed",
        "iortd/dashboard/static/index.html",
        "iortd/config/doserate/intrabeam.toml",
        "iortd/schemas/v1/prescription.schema.json",
    ):
        assert data in names, f"{data} missing from {wheel.name}"

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, symlinks=True)
    py = env_dir / "bin" / "python"
    view = tmp_path / "deps"
    _dependencies_view(view)
    purelib = _run(
        [str(py), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=tmp_path,
        deadline=deadline,
    ).strip()
    Path(purelib, "_iortd_test_deps.pth").write_text(f"{view}\n")
    into = [*pip, "--python", str(py), "install", "-q"]
    _run(
        [*into, "--no-deps", "--no-index", str(wheel), str(example_wheel)],
        cwd=tmp_path,
        deadline=deadline,
    )

    probe = (
        "import importlib.util, sys; "
        f"found = [n for n in {GENERIC + REPORTS_EXTRA!r} if importlib.util.find_spec(n)]; "
        "print(found); sys.exit(1 if found else 0)"
    )
    _run([str(py), "-I", "-c", probe], cwd=tmp_path, deadline=deadline)

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    iortd = str(env_dir / "bin" / "iortd")
    # Bundled data through the namespace: the demo config validates the sim driver's
    # profile and the dashboard's schemas load from the installed package.
    _run(
        [iortd, "check-config", str(tree / "config" / "demo.toml")],
        cwd=tmp_path,
        deadline=deadline,
        env=env,
    )
    _run(
        [
            str(py),
            "-I",
            "-c",
            "from iortd.dashboard.schemas import published; "
            "assert published('telemetry')['type'] == 'object'",
        ],
        cwd=tmp_path,
        deadline=deadline,
    )

    # Without the extra: the daemon imports none of its libraries, verify works, and the
    # report says in one line what to install.
    heavy_probe = (
        "import sys; from iortd.daemon.cli import main; "
        f"rc = main(['check-config', {str(tree / 'config' / 'demo.toml')!r}]); "
        f"heavy = sorted({{m.partition('.')[0] for m in sys.modules}} & {set(REPORTS_EXTRA)!r}); "
        "print(heavy); sys.exit(rc or bool(heavy))"
    )
    _run([str(py), "-I", "-c", heavy_probe], cwd=tmp_path, deadline=deadline)
    audit = str(env_dir / "bin" / "iort-audit")
    golden = tree / GOLDEN
    log_args = [str(golden / "log"), "--pubkey", str(golden / "or-9.pub")]
    out = _run([audit, "verify", *log_args], cwd=tmp_path, deadline=deadline, env=env)
    assert out.startswith("INTACT:"), out
    proc = subprocess.run(
        [audit, "report", *log_args, "--delivery", GOLDEN_DELIVERY, "--out", "r.pdf"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=max(1.0, deadline - time.monotonic()),
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "pip install 'iortd[reports]'" in proc.stderr, proc.stderr
    assert not (tmp_path / "r.pdf").exists()

    # iort-plan: `new` needs nothing beyond the base install; `import` (pydicom, the extra
    # `plan`) says in one line what to install.
    plan = str(env_dir / "bin" / "iort-plan")
    rx_args = ["--treatment-id", "T-1", "--plan-id", "P-1", "--approved-by", "phys.a"]
    new = [*rx_args, "--dose-gy", "20", "--applicator", "SPH30", "--diameter-mm", "30"]
    out = _run(
        [plan, "new", *new, "--planned-time-min", "23"], cwd=tmp_path, deadline=deadline, env=env
    )
    assert '"prescribed_dose_gy":20.0' in out, out
    (tmp_path / "p.dcm").write_bytes(b"x")
    proc = subprocess.run(
        [plan, "import", "p.dcm", *rx_args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=max(1.0, deadline - time.monotonic()),
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install 'iortd[plan]'" in proc.stderr, proc.stderr

    # The example driver is found through its entry point, and its own validate runs.
    example_cfg = tmp_path / "example.toml"
    shutil.copy(EXAMPLE / "example.toml", example_cfg)
    out = _run([iortd, "check-config", str(example_cfg)], cwd=tmp_path, deadline=deadline, env=env)
    assert "source-1=example-kv" in out, out
    bad = tmp_path / "bad.toml"
    bad.write_text(example_cfg.read_text().replace("max_line = 256", "max_line = 3"))
    proc = subprocess.run(
        [iortd, "check-config", str(bad)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=max(1.0, deadline - time.monotonic()),
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "devices[0].options.max_line" in proc.stderr, proc.stderr

    # python-daemon beside it: `import daemon` is python-daemon's, iortd still works.
    _run([*into, "python-daemon"], cwd=tmp_path, deadline=deadline)
    _run(
        [
            str(py),
            "-I",
            "-c",
            "import daemon; assert hasattr(daemon, 'DaemonContext'), "
            "daemon.__file__; import iortd.daemon.cli",
        ],
        cwd=tmp_path,
        deadline=deadline,
    )
    _run([iortd, "check-config", str(example_cfg)], cwd=tmp_path, deadline=deadline, env=env)
