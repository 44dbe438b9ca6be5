"""The MQTT stream: topic schema v1 (payloads.py), the on-disk outbox (outbox.py), the
sink that publishes with reconnect and replay (sink.py: the connect loop and the
publishing order), its broker connection (link.py: client id, settings, takeover
detection, what paho reports only in its log), its retained state topics and the guard on
the off-host checkpoint (retained.py), its plug-in factory (factory.py, entry point
``mqtt``) and a private Mosquitto for the demo, tests and benchmarks (broker.py). The
client TLS context is kernel/tls.py's.

Topics, payloads, delivery guarantees and consumer rules are documented in
docs/mqtt-topics.md, with a JSON Schema per payload in docs/schemas/v1/.
"""
