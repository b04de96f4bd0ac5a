"""Shared by the agent and the server.

The one atomic-write helper and the agent's exception tree.
"""
