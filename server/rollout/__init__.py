"""Staged rollouts.

The pure policy core, the service that applies it to stored facts, and the scheduler.
"""
