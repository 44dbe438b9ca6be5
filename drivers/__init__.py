"""Drivers: the driver interface, typed readings, errors and built-in drivers."""
