"""Data package: bundled site configs (installed as ``iort_config``)."""
