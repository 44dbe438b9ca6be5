"""Data package: built-in simulator profiles (installed as ``iort_config.profiles``)."""
