"""Loads tests/suite_plugin.py, the suite's own plug-in (how the suite shares its workers).

Nothing else goes here: mypy cannot check two modules named ``conftest`` (this one and
tests/integration/conftest.py), so ``[tool.mypy]`` leaves this file out and checks
suite_plugin.py. pytest puts this folder on ``sys.path`` when it imports this file.
"""

pytest_plugins = ["suite_plugin"]
