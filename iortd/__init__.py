"""iortd: one import namespace for everything the distribution installs.

The source tree keeps one folder per part (``daemon/``, ``drivers/``, ``simulators/``,
``dashboard/``, the data folders ``config/`` and ``docs/schemas/``); they install as
``iortd.daemon``, ``iortd.drivers``, ``iortd.simulators``, ``iortd.dashboard``,
``iortd.config`` and ``iortd.schemas``, so no generic top-level name (``daemon`` is also the
import name of python-daemon) lands in site-packages.

How the name resolves (docs/development.md, "The iortd namespace"):

- **wheels and editable installs**: ``[tool.setuptools] package-dir`` in pyproject.toml maps
  each subpackage to its folder; this file's folder is the package ``iortd`` itself.
- **static tools on a clean clone** (mypy, ruff, an IDE) and ``python -m iortd...`` run from
  the repository root: the entries beside this file are relative symbolic links
  (``daemon -> ../daemon``, ...), so ``iortd/daemon/cli.py`` is a real path on disk and no
  import hook has to be followed. Builds do not rely on them (the mapping is explicit).

Nothing is imported here: ``import iortd`` costs nothing and pulls in no part.
"""
