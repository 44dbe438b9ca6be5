"""The MQTT stream: topic schema v1 (payloads.py), the on-disk outbox (outbox.py), the
sink that publishes with reconnect and replay (sink.py), the client TLS context
(tls.py) and a private Mosquitto for the demo, tests and benchmarks (broker.py).

Topics, payloads, delivery guarantees and consumer rules are documented in
docs/mqtt-topics.md, with a JSON Schema per payload in docs/schemas/v1/.
"""
