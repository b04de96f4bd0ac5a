"""Push-driven updates: tell a device over MQTT to check in when its target changes.

``queue`` records requests in the ``push_requests`` table (any process, inside
the transaction that made the change); ``pacer`` drains them at a fixed rate
through the server's MQTT client. Polling stays as the slow fallback.
"""
