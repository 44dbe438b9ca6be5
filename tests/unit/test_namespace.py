"""The one import namespace (``iortd.*``) and the plug-in surface, checked from the tree.

- pyproject lists and maps every package folder, and the links in ``iortd/`` that static
  tools follow point where the mapping does (a subpackage added but not listed would be
  missing from the wheel while every test run from the tree still passes);
- no file names the old top-level packages (``from daemon.x``, ``"drivers.serial_xrs:..."``):
  the rewrite script finds nothing to do, so a branch merged from before the namespace is
  caught here, with the command that fixes it;
- the example third-party driver imports only the public modules docs/engineers.md names, and
  behaves like a driver (identify, read, bad bytes, a device error, an unreported
  interlock) on the scripted transport.

The wheel in a fresh venv is tests/integration/test_install_wheel_venv.py.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from iortd.drivers.errors import DeviceFault, DriverOptionError, ProtocolViolation
from iortd.drivers.interface import DriverContext, DriverFactory
from iortd.drivers.transport import Eof, Expect, Reply, ScriptedTransport
from iortd.kernel.clock import SystemClock
from iortd.kernel.types import DeviceState, Interlock, InterlockState

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
EXAMPLE_SRC = ROOT / "examples" / "iortd-driver-example" / "src" / "iortd_driver_example"

# What a plug-in may import (docs/engineers.md, "Writing a driver"); everything else is private.
PUBLIC = (
    "iortd.drivers.interface",
    "iortd.kernel.types",
    "iortd.drivers.errors",
    "iortd.drivers.transport",
    "iortd.kernel.clock",
    "iortd.daemon.sinks",
)


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_package_folder_is_listed_mapped_and_linked() -> None:
    mapping: dict[str, str] = SETUPTOOLS["package-dir"]
    listed = set(SETUPTOOLS["packages"])
    assert mapping["iortd"] == "iortd"
    expected: set[str] = set()
    for package, folder in mapping.items():
        root = ROOT / folder
        assert root.is_dir(), f"package-dir maps {package} to missing folder {folder}"
        if package != "iortd":
            link = ROOT / "iortd" / package.removeprefix("iortd.")
            assert link.is_symlink(), f"iortd/{link.name} should be a link to ../{folder}"
            assert link.resolve() == root.resolve(), f"iortd/{link.name} -> {link.resolve()}"
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root).parts
            expected.add(".".join((package, *rel)))
    missing = expected - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    # config/ is data only: its folders are listed as (namespace) packages, no Python.
    assert not list((ROOT / "config").rglob("*.py")), "config/ holds data only"
    for data in [ROOT / "config", *(p for p in (ROOT / "config").iterdir() if p.is_dir())]:
        if any(data.glob("*.toml")):
            name = ".".join(("iortd.config", *data.relative_to(ROOT / "config").parts))
            assert name in listed, f"{name} (data) is not in [tool.setuptools] packages"


def test_entry_points_and_tools_name_the_namespace() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    drivers = PYPROJECT["project"]["entry-points"]["iort.drivers"]
    for target in [*scripts.values(), *drivers.values()]:
        assert target.startswith("iortd."), target
    assert PYPROJECT["tool"]["ruff"]["lint"]["isort"]["known-first-party"] == ["iortd"]
    assert PYPROJECT["tool"]["mypy"]["files"][0] == "iortd"


def test_no_file_names_the_old_top_level_packages(capsys: pytest.CaptureFixture[str]) -> None:
    script = _load("namespace_imports", ROOT / "scripts" / "namespace-imports.py")
    status = script.main(["--check"])
    left = capsys.readouterr().out
    assert status == 0, (
        "these files still name daemon/drivers/simulators/dashboard (or iort_config, "
        f"iort_schemas) as top-level packages; run scripts/namespace-imports.py:\n{left}"
    )


def test_rewrite_script_is_precise_and_idempotent() -> None:
    script = _load("namespace_imports", ROOT / "scripts" / "namespace-imports.py")
    before = (
        "from daemon.cli import main\n"
        "import daemon.mqtt.broker as broker_mod\n"
        'argv = [sys.executable, "-m", "dashboard.cli"]\n'
        'target = "drivers.serial_xrs:SerialXrsFactory"\n'
        "await daemon.run(stop)\n"
        'log = tmp_path / "dashboard.log"\n'
        'files("iort_config") / "demo.toml"\n'
        '"""See :class:`~drivers.errors.ProtocolViolation`."""\n'
    )
    after = script.rewrite(before, ".py")
    assert after == (
        "from iortd.daemon.cli import main\n"
        "import iortd.daemon.mqtt.broker as broker_mod\n"
        'argv = [sys.executable, "-m", "iortd.dashboard.cli"]\n'
        'target = "iortd.drivers.serial_xrs:SerialXrsFactory"\n'
        "await daemon.run(stop)\n"
        'log = tmp_path / "dashboard.log"\n'
        'files("iortd.config") / "demo.toml"\n'
        '"""See :class:`~iortd.drivers.errors.ProtocolViolation`."""\n'
    )
    assert script.rewrite(after, ".py") == after


def _iortd_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "iortd" or name.startswith("iortd.")}


def test_example_driver_imports_only_public_modules() -> None:
    used: set[str] = set()
    for path in EXAMPLE_SRC.rglob("*.py"):
        used |= _iortd_imports(path)
    assert used, "the example driver should import iortd's driver interface"
    assert used <= set(PUBLIC), f"private iortd modules imported: {sorted(used - set(PUBLIC))}"


def test_engineers_doc_names_the_public_modules() -> None:
    doc = (ROOT / "docs" / "engineers.md").read_text("utf-8")
    heading = re.search(r"^(#{2,3}) Writing a driver\s*$", doc, re.MULTILINE)
    assert heading, "docs/engineers.md has no 'Writing a driver' section"
    level = heading.group(1)
    rest = doc[heading.end() :]
    following = re.search(rf"^#{{1,{len(level)}}} ", rest, re.MULTILINE)
    section = rest[: following.start()] if following else rest
    named = set(re.findall(r"`(iortd\.[a-z_.]+)`", section))
    assert named >= set(PUBLIC), (
        f"docs/engineers.md 'Writing a driver' does not name {set(PUBLIC) - named}"
    )
    assert "examples/iortd-driver-example" in section


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return _load("iortd_driver_example", EXAMPLE_SRC / "__init__.py")


CTX = DriverContext(clock=SystemClock(), seed=0)
STATUS = (
    b"state=IRRADIATING dose1=4.210 dose2=4.198 rate=0.62 preset=20 beam_s=407.3"
    b" kv=50.0 ua=40.0 door=ok\r\n"
)


def test_example_factory_satisfies_the_interface_and_validates(example: ModuleType) -> None:
    factory: DriverFactory = example.ExampleKvFactory()
    assert factory.name == "example-kv"
    factory.validate({"max_line": 128}, {"type": "tcp", "host": "192.0.2.10", "port": 4001})
    with pytest.raises(DriverOptionError) as bad:
        factory.validate({"max_line": 3}, {"type": "tcp", "host": "h", "port": 1})
    assert bad.value.key == "options.max_line"
    with pytest.raises(DriverOptionError) as missing:
        factory.validate({}, {})
    assert missing.value.key == "transport"


async def test_example_driver_reads_and_fails_safe(example: ModuleType) -> None:
    script: list[Expect | Reply | Eof] = [
        Expect(b"IDENT\r\n"),
        Reply(b"mfr=Example model=KV-1 serial=KV1-0042 fw=1.3\r\n"),
        Expect(b"STATUS\r\n"),
        Reply(STATUS),
        Expect(b"STATUS\r\n"),
        Reply(b"state=READY dose1=x\r\n"),
        Expect(b"STATUS\r\n"),
        Reply(b"err=E17\r\n"),
    ]
    transport = ScriptedTransport(script)
    async with example.ExampleKvDriver(transport, CTX, max_line=256) as driver:
        ident = await driver.identify()
        assert (ident.manufacturer, ident.serial, ident.simulated) == ("Example", "KV1-0042", False)
        reading = await driver.read()
        assert reading.state is DeviceState.IRRADIATING
        assert reading.dose_primary_gy == pytest.approx(4.21)
        assert reading.interlocks[Interlock.DOOR] is InterlockState.OK
        # Not reported: unknown (which counts as tripped), never assumed ok.
        assert reading.interlocks[Interlock.EMERGENCY_STOP] is InterlockState.UNKNOWN
        with pytest.raises(ProtocolViolation, match="dose1"):
            await driver.read()
        with pytest.raises(DeviceFault, match="E17"):
            await driver.read()
    transport.assert_done()
