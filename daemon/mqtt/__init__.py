"""The MQTT stream: topic schema v1 (payloads.py).

Topics, payloads and consumer rules are documented in docs/mqtt-topics.md, with a JSON
Schema per payload in docs/schemas/v1/. The sink that publishes them (reconnect, outbox,
replay) is not built yet.
"""
