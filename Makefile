# Two commands for a new user:  `make demo`  and  `make test`.
# Both bootstrap what they need: a virtual environment with the locked Python packages,
# and the Debian packages (installed when run as root with apt-get, otherwise an exact
# instruction is printed).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Debian package:command pairs the tests and the demo rely on (orthanc and dcmtk: the DICOM
# peers of the hand-off tests, started by the tests themselves, never as services).
SYSTEM_PACKAGES := mosquitto:mosquitto mosquitto-clients:mosquitto_sub mbpoll:mbpoll \
	chromium:chromium poppler-utils:pdftoppm dicom3tools:dciodvfy \
	orthanc:Orthanc dcmtk:storescp
# What building and testing the Debian package needs besides dpkg (`make deb`, the package
# and unit tests): systemd-analyze and systemd-sysusers, Debian's own Python 3.11.
PACKAGE_TOOLS := systemd:systemd-analyze python3.11:python3.11

.PHONY: demo test lint typecheck typecheck-beside-unit unit system-packages package-tools venv deb clean

demo: venv system-packages
	$(BIN)/iortd demo

test: venv system-packages package-tools lint typecheck-beside-unit

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/lock.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || \
		{ echo "iortd needs Python 3.11 or newer; run: make PYTHON=python3.11 $(MAKECMDGOALS)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	@# The lock holds every package with its dependencies at exact versions, so it is
	@# installed as it is (--no-deps): pip's resolver was most of a fresh clone's install
	@# time. `pip check` then fails on a dependency the lock misses, and
	@# tests/unit/test_lock.py on a pin of pyproject.toml it does not hold. --no-compile:
	@# Python compiles what is imported when it is first imported, not every installed file.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile \
		--no-deps --requirement requirements/lock.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile \
		--no-deps --editable '.[dev,reports]'
	$(BIN)/python -m pip check --disable-pip-version-check
	@touch $(STAMP)

system-packages:
	@scripts/ensure-system-packages $(SYSTEM_PACKAGES)

package-tools:
	@scripts/ensure-system-packages $(PACKAGE_TOOLS)

# The room host's Debian package: dist/iortd_VERSION_ARCH.deb (docs/operations.md).
deb: venv package-tools
	packaging/build-deb --out dist

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

# `make test` runs mypy beside pytest rather than before it: on a fresh clone (no cache)
# mypy keeps one core busy for about half a minute, which would be that much more wall
# time before the first test. It runs at a lower priority (nice 10), so that it takes
# what the pytest workers leave rather than the CPU that the daemons and simulators of the
# real-time tests wake up for. Its report is printed when pytest is done; either failing
# fails the target.
typecheck-beside-unit: venv
	@mkdir -p test-artifacts
	@nice -n 10 $(BIN)/mypy > test-artifacts/mypy.txt 2>&1 & mypy_pid=$$!; \
	$(MAKE) --no-print-directory unit; unit_rc=$$?; \
	wait $$mypy_pid; mypy_rc=$$?; \
	echo "$(BIN)/mypy (run beside pytest):"; cat test-artifacts/mypy.txt; \
	exit $$(( unit_rc || mypy_rc ))

# The whole suite on pytest-xdist workers (one per core, at most four; `make unit
# TEST_WORKERS=1` for one), whole files to a worker (`--dist loadfile`: a module's
# fixtures, such as the e2e files' shared runs, are built once), under coverage.py through
# pytest-cov, which measures each worker and combines them. The figure printed is the share
# of production lines (kernel/ drivers/ simulators/ auditlog/ daemon/ audit/ dashboard/ plan/)
# run in the test processes; code that runs only inside the daemons, simulators and
# dashboards the integration tests start as processes is not counted, so it is a lower
# bound. Per-file: test-artifacts/coverage.txt.
TEST_WORKERS ?= auto
unit: venv
	@mkdir -p test-artifacts
	$(BIN)/coverage erase
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile --no-loadscope-reorder \
		--cov --cov-report=
	@$(BIN)/coverage report > test-artifacts/coverage.txt
	@echo "coverage: $$($(BIN)/coverage report --format=total)% of production lines (test processes only; per file: test-artifacts/coverage.txt)"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis test-artifacts .coverage build dist
