"""Fault scenarios for `iort-sim serve --scenario NAME` (data, not code)."""
