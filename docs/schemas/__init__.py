"""The published JSON Schemas of the MQTT topics, installed as package data (``iortd.schemas``).

Nothing but the ``v1/*.schema.json`` files: they are installed so that a consumer (the
dashboard, `dashboard/schemas.py`) validates every payload with the very files the
documentation links to, never with a copy that could drift.
"""
