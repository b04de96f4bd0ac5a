"""Wire formats shared by the agent and the server.

The device is the party that verifies these, so the agent owns them and the
server imports them (never the reverse).
"""
