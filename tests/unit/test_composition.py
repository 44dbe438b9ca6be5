"""One composition root: what builds the daemon is in daemon/app.py, what only the demo
does is in daemon/demo.py, and the command line is parsing and dispatch.

Read from the source with ``ast`` (as tests/unit/test_layers.py does), so that a later
change that builds a log, an outbox or a driver loop somewhere else, or that grows the
command line back into a second root, fails here with the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DAEMON = ROOT / "daemon"

# What only the composition root constructs: the record, the device loops, the running
# service. (Sinks are built by their own factories, which the root calls from one place,
# ``_open_sinks``; a factory may live beside its sink.)
ROOT_ONLY = {"AuditLog.open", "DeviceLoop", "Service"}

# What the command line must not need: processes, terminals, brokers, the console view.
NOT_IN_CLI = {
    "subprocess",
    "select",
    "signal",
    "tempfile",
    "iortd.daemon.mqtt",
    "iortd.daemon.console",
    "iortd.auditlog.writer",
}


def _called(node: ast.Call) -> str:
    f = node.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f"{f.value.id}.{f.attr}"
    if isinstance(f, ast.Name):
        return f.id
    return ""


def test_only_the_composition_root_opens_the_log_and_builds_the_device_loops() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno} builds {_called(node)}"
        for path in sorted(DAEMON.rglob("*.py"))
        if path.name != "app.py"
        for node in ast.walk(ast.parse(path.read_text("utf-8")))
        if isinstance(node, ast.Call) and _called(node) in ROOT_ONLY
    ]
    assert not found, "only daemon/app.py builds these:\n" + "\n".join(found)


def test_the_command_line_is_parsing_and_dispatch() -> None:
    path = DAEMON / "cli.py"
    imported = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            imported |= {(a.name, node.lineno) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add((node.module, node.lineno))
    wrong = sorted(
        f"daemon/cli.py:{line} imports {name} (demo or run machinery: daemon/demo.py, app.py)"
        for name, line in imported
        if any(name == x or name.startswith(x + ".") for x in NOT_IN_CLI)
    )
    assert not wrong, "\n".join(wrong)
    lines = len(path.read_text("utf-8").splitlines())
    assert lines <= 200, f"daemon/cli.py has {lines} lines: it is meant to parse and dispatch"
