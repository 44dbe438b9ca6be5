"""iort-dashboard: the live delivery dashboard, a consumer of the MQTT stream only.

``dashboard.cli`` (the command), ``dashboard.mqtt`` (the one MQTT connection),
``dashboard.state`` (what is held, built from messages only), ``dashboard.hub`` (fan-out
to browser streams), ``dashboard.app`` (the web app) and ``static/`` (the page itself).
"""
