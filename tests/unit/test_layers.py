"""The import contract: layers point one way, and no module imports itself round a cycle.

Walks the real source folders (not the installed package: an editable install's import hook
and the links in ``iortd/`` are not what the wheel ships), parses every module with ``ast``
and reads every import, at module level, inside functions and under ``TYPE_CHECKING`` alike,
with relative imports resolved. Then it checks three things:

1. **Layers** (docs/development.md, "Layers"): each part may import only the parts listed
   under it in :data:`ALLOWED`. The picture::

       dashboard      audit (auditors' tools)     daemon        simulators
           |  \\          |   plan (prescriptions)/    \\            |
           |   users     |  /                   /      \\           |
           |     \\--> auditlog (log core)  <----+    drivers  <-----+
           |             |                              |
           +-------------+----------- kernel -----------+

   (``users``, the account store, on the log core; the dashboard may use it for its login;
   ``witness``, iort-witness, on the log core beside ``audit``; the DICOM sink plug-in in
   ``audit`` may import the daemon's plug-in API, :data:`PLUGIN_API`)

2. **No cycles** between modules (Tarjan's strongly connected components), so any module can
   be read, tested and cut without dragging in the ones that depend on it.
3. **Heavy or protocol libraries stay where they belong**: reportlab, matplotlib, pydicom and
   pynetdicom only in the auditors' tools (the extra ``reports``), pydicom also in the RT
   Plan import ``plan/dicom_import.py`` (the extra ``plan``); pymodbus only in the driver's Modbus
   codec (its API changes between minor releases; the simulator frames Modbus without it, so
   the two sides of the protocol stay independent); argon2 only in the account store
   (``users/``: one implementation of password hashing).

A broken arrow fails with the importing file, its line and the rule it breaks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# part -> the parts it may import (besides itself)
ALLOWED: dict[str, frozenset[str]] = {
    "kernel": frozenset(),
    "drivers": frozenset({"kernel"}),
    "simulators": frozenset({"kernel", "drivers"}),
    "auditlog": frozenset({"kernel"}),
    # daemon -> plan: the prescription command's body is parsed by the plan model's strict
    # parser (daemon/prescriptions.py), one parser for the sender and the receiver; pydicom
    # stays confined to plan/dicom_import.py (CONFINED), which the daemon does not import.
    "daemon": frozenset({"kernel", "drivers", "auditlog", "plan"}),
    "audit": frozenset({"kernel", "auditlog"}),
    # dashboard -> users: the login (issue 19, item 2) unlocks a user's signing key with
    # users.unlock; users sits on the log core, below every tool that acts for a person.
    "dashboard": frozenset({"kernel", "users"}),
    "plan": frozenset({"kernel", "auditlog"}),
    # iort-users' account store (issue 19): on the log core (the keyring format, the signed
    # record, Ed25519 keys). The daemon never imports it: it reads the keyring file only.
    "users": frozenset({"kernel", "auditlog"}),
    # iort-witness (issue 20, item 3): its own service, on the log core (checkpoints, Merkle
    # proofs, cosignatures). The daemon never imports it: the client it calls is in the
    # log core (auditlog/witness_client.py), so the witness's web stack stays out of it.
    "witness": frozenset({"kernel", "auditlog"}),
    # iort-ingest (issue 22): the central consumer, on the log core (it signs its replay
    # requests with auditlog/command.py). It never imports the daemon: it reads MQTT only.
    "ingest": frozenset({"kernel", "auditlog"}),
}
PARTS = tuple(ALLOWED)

# A sink plug-in shipped with the auditors' tools (it needs their DICOM libraries, which the
# daemon never imports) may import the daemon's plug-in API, the one module a third-party
# sink imports (daemon/sinks.py), and nothing else of the daemon. Loaded by entry point.
PLUGIN_API: dict[str, frozenset[str]] = {
    "iortd.audit.dicom_sink": frozenset({"iortd.daemon.sinks"}),
}

# third-party top-level module -> the project modules allowed to import it
CONFINED: dict[str, tuple[str, ...]] = {
    "reportlab": ("iortd.audit.",),
    "matplotlib": ("iortd.audit.",),
    # and the RT Plan import (the extra ``plan``); never the daemon
    "pydicom": ("iortd.audit.", "iortd.plan.dicom_import"),
    # DICOM networking (the hand-off to the hospital, issue 23): the auditors' tools only
    "pynetdicom": ("iortd.audit.",),
    "pymodbus": ("iortd.drivers.modbus_codec",),
    # password hashing and key derivation: one implementation, in the account store
    "argon2": ("iortd.users.",),
}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    file: Path
    line: int

    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(("iortd", *parts))


def source_files() -> Iterator[Path]:
    for part in PARTS:
        folder = ROOT / part
        assert folder.is_dir(), f"part {part!r} has no folder {folder}"
        yield from sorted(folder.rglob("*.py"))


def imports_of(path: Path, name: str | None = None) -> Iterator[Import]:
    """Every import in the file; ``name`` is the module name it has (or would have)."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text("utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(name, alias.name, path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            for alias in node.names:
                # "from pkg import mod" imports the module pkg.mod when there is one.
                yield Import(name, f"{stem}.{alias.name}", path, node.lineno)


@pytest.fixture(scope="module")
def graph() -> tuple[set[str], list[Import]]:
    modules = {module_name(p) for p in source_files()}
    edges = [imp for p in source_files() for imp in imports_of(p)]
    return modules, edges


def _resolve(target: str, modules: set[str]) -> str | None:
    """The project module an import names (the longest dotted prefix that is one)."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def _part(module: str) -> str:
    return module.split(".")[1]


def layer_violations(modules: set[str], edges: list[Import]) -> list[str]:
    found = []
    for imp in edges:
        if not imp.target.startswith("iortd."):
            continue
        source, target = _part(imp.importer), imp.target.split(".")[1]
        if target in ("config", "schemas"):
            found.append(f"{imp.where()}: {imp.importer} imports data package {imp.target}")
            continue
        if _resolve(imp.target, modules) in PLUGIN_API.get(imp.importer, ()):
            continue
        if target != source and target not in ALLOWED[source]:
            allowed = ", ".join(sorted(ALLOWED[source])) or "no other part"
            found.append(
                f"{imp.where()}: {imp.importer} imports {imp.target}: "
                f"{source} may import only {allowed}"
            )
    return found


def cycles(modules: set[str], edges: list[Import]) -> list[list[str]]:
    succ: dict[str, set[str]] = {m: set() for m in modules}
    for imp in edges:
        target = _resolve(imp.target, modules)
        if target is not None and target != imp.importer:
            # A package's __init__ importing its own submodule is not a cycle of design.
            succ[imp.importer].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def strong(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            strong(v)
    return out


def confinement_violations(edges: list[Import]) -> list[str]:
    found = []
    for imp in edges:
        top = imp.target.split(".")[0]
        allowed = CONFINED.get(top)
        if allowed is not None and not imp.importer.startswith(allowed):
            found.append(
                f"{imp.where()}: {imp.importer} imports {top}, allowed only in "
                f"{', '.join(a.rstrip('.') for a in allowed)}"
            )
    return found


def test_every_part_has_a_rule_and_a_folder() -> None:
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"iortd", "tests"}
    assert folders == set(PARTS), f"parts without a layer rule: {sorted(folders - set(PARTS))}"


def test_layers_point_one_way(graph: tuple[set[str], list[Import]]) -> None:
    modules, edges = graph
    assert len(modules) > 50, "the walk found too few modules: is ROOT right?"
    broken = layer_violations(modules, edges)
    assert not broken, "layer rule broken (tests/unit/test_layers.py, ALLOWED):\n" + "\n".join(
        broken
    )


def test_no_import_cycles(graph: tuple[set[str], list[Import]]) -> None:
    modules, edges = graph
    found = cycles(modules, edges)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_heavy_and_protocol_libraries_are_confined(graph: tuple[set[str], list[Import]]) -> None:
    _, edges = graph
    broken = confinement_violations(edges)
    assert not broken, "\n".join(broken)


def test_the_checks_catch_what_they_name(tmp_path: Path) -> None:
    """Each check fails on a planted breach (so a check that silently passes is caught)."""
    f = ROOT / "kernel" / "clock.py"
    modules = {"iortd.kernel.clock", "iortd.daemon.tracker", "iortd.drivers.x", "iortd.drivers.y"}
    up = Import("iortd.kernel.clock", "iortd.daemon.tracker.DeliveryTracker", f, 1)
    assert layer_violations(modules, [up]), "kernel -> daemon not reported"
    side = Import("iortd.kernel.clock", "iortd.config.maps", f, 1)
    assert layer_violations(modules, [side]), "import of a data package not reported"
    loop = [
        Import("iortd.drivers.x", "iortd.drivers.y.f", f, 1),
        Import("iortd.drivers.y", "iortd.drivers.x", f, 2),
    ]
    assert cycles(modules, loop) == [["iortd.drivers.x", "iortd.drivers.y"]]
    heavy = Import("iortd.daemon.tracker", "reportlab.pdfgen", f, 1)
    assert confinement_violations([heavy]), "daemon -> reportlab not reported"
    # Relative imports resolve against the importing package.
    sample = tmp_path / "m.py"
    sample.write_text("from . import x\nfrom ..kernel import types\n", "utf-8")
    got = [i.target for i in imports_of(sample, "iortd.daemon.mqtt.sink")]
    assert got == ["iortd.daemon.mqtt.x", "iortd.daemon.kernel.types"]
