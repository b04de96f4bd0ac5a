"""How the agent talks to the fleet.

The device HTTP API, MQTT through an on-disk outbox, batched event reports.
"""
