"""iort-dashboard: the live delivery dashboard, a consumer of the MQTT stream only.

``iortd.dashboard.cli`` (the command), ``iortd.dashboard.mqtt`` (the one MQTT
connection), ``iortd.dashboard.state`` (what is held, built from messages only),
``iortd.dashboard.hub`` (fan-out to browser streams), ``iortd.dashboard.app`` (the web app)
and ``static/`` (the page itself).
"""
