"""MQTT on the server side: the embedded broker, Mosquitto ACL export and telemetry ingest."""
