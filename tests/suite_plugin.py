"""The suite's own pytest plug-in, loaded by tests/conftest.py: how the whole suite shares
two cores (docs/development.md, "Running the tests").

``make test`` runs pytest on pytest-xdist workers with ``--dist loadfile``: a test file is
one unit of work, sent whole to one worker, so that a module's fixtures (the e2e files'
shared runs, the report's logs) are built once. Two refinements live here:

- ``ONE_UNIT``: files that must never run at the same time as each other share one unit
  (so one worker, one after another). These are the files that start a swarm of
  processes at once (eight simulator/daemon pairs, five demos, four daemons) or a
  Chromium, and the Modbus RTU ones whose line time is modelled, all judging what they
  see against real-time bounds of a few poll periods: two of them side by side starve
  each other's processes of the second core they were written against (a first run on
  two workers showed RTU deliveries going stale beside the report's four daemons).
  Beside any one of them the other worker runs the rest.
- ``FIRST``: the order units are handed out. A worker takes the next unit when it is
  almost out of work, and the run ends when the last unit ends, so the longest units go
  first (durations from ``--durations``, listed in docs/development.md) and the many short
  ones fill in at the end. A file missing from the list only runs later; a file renamed
  without updating it is reported, so the list cannot rot silently.

Hypothesis: the ``suite`` profile turns off the per-example ``deadline`` (200 ms by
default) and the ``too_slow`` health check. Both time one example or its data generation
on the wall clock, which on two shared workers under coverage measures the neighbours, not
the code; no test here is about how fast one example runs, and each test still has
pytest-timeout's bound.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from xdist.remote import Producer
    from xdist.scheduler import LoadFileScheduling

settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")

TESTS = Path(__file__).parent

# Files run one after another on one worker, with why (the module docstring).
ONE_UNIT: dict[str, str] = dict.fromkeys(
    (
        "integration/test_fidelity_e2e.py",  # eight simulator/daemon pairs at once
        "integration/test_serial_xrs_e2e.py",  # a delivery and the bundled scenarios at once
        "integration/test_audit_report.py",  # four daemons (reportlogs.py) at once
        "integration/test_demo_leaves_nothing.py",  # five whole demos at once, twice
        "integration/test_dashboard_browser.py",  # Chromium
        "integration/test_dashboard_hostile_e2e.py",  # Chromium
        "integration/test_dashboard_applicator_browser.py",  # Chromium
        "integration/test_dashboard_login_browser.py",  # Chromium
        "integration/test_dashboard_verification_browser.py",  # Chromium
        "integration/test_signoff_browser.py",  # Chromium, and a delivery over Mosquitto
        "integration/test_alarm_ack_browser.py",  # Chromium, and a delivery over Mosquitto
        "integration/test_dashboard_fabric_browser.py",  # Chromium, and three Mosquittos bridged
        # Modbus RTU over a pty with the line's time modelled: a few poll periods of slack
        "integration/test_modbus_xrs_e2e.py",
        "integration/test_shared_line_e2e.py",
        "integration/test_applicator_rules_e2e.py",
        # 10 rooms at 10 Hz, three Mosquittos bridged, iort-ingest, a 10 s outage timeline
        "integration/test_fabric_fault.py",
        # samples within half of a stalled fsync (0.75 s): not beside a swarm of processes
        "integration/test_mqtt_stalled_disk.py",
    ),
    "realtime",
)

# The longest units first (each a file or the ONE_UNIT group), longest first: the sums of
# each file's test durations in a run of the whole suite on two workers.
FIRST: tuple[str, ...] = (
    "realtime",
    "unit/test_modbus_fuzz.py",
    "integration/test_verification_e2e.py",
    "unit/test_modbus_apl_fuzz.py",
    "integration/test_audit_tamper.py",
    "integration/test_dicom_sink_e2e.py",  # ~28 s unloaded: three daemons, four Orthancs
    "integration/test_check_config_cli.py",
    "integration/test_mqtt_stream.py",
    "integration/test_audit_forger.py",
    "unit/test_xrs_ascii_fuzz.py",
    "unit/test_log_volume.py",
    "integration/test_install_wheel_venv.py",
    "unit/test_dashboard_hostile.py",
    "integration/test_debian_package.py",
    "unit/test_mqtt_payloads.py",
    "unit/test_dashboard_fairness.py",
    "integration/test_mqtt_crash.py",  # fifty SIGKILLs, about 25 s alone
    "integration/test_audit_crash.py",
    "unit/test_audit_canonical.py",
    "integration/test_cli.py",
    "integration/test_audit_applicator_report.py",
    "unit/test_audit_applicator.py",
    "integration/test_dashboard_cli.py",
    "integration/test_mqtt_security.py",
    "integration/test_dicom_peers.py",
)


def unit_of(nodeid: str) -> str:
    """The unit a test belongs to: its file relative to tests/, or its ONE_UNIT group."""
    path = nodeid.split("::", 1)[0].removeprefix("tests/")
    return ONE_UNIT.get(path, path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker: the units in FIRST's order, the rest as collected. Every worker
    collects the same list and orders it the same way, which xdist checks."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    named = [p for p in (*ONE_UNIT, *FIRST) if p not in ONE_UNIT.values()]
    missing = [p for p in named if not (TESTS / p).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py names test files that do not exist: {missing}")
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(unit_of(item.nodeid), len(rank)))


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> LoadFileScheduling | None:
    """``--dist loadfile`` with the ONE_UNIT groups; any other mode is xdist's own."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling  # noqa: PLC0415 - only under xdist

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return Scheduling(config, log)
