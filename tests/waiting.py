"""Polling helpers shared by the tests that wait on a live server, broker or agent.

Tests that talk to real processes cannot know when a message has landed, so
they poll with a deadline. Two shapes are needed: ``wait_for`` returns the
first truthy value a probe gives and fails the test with what it waited for;
``eventually`` answers a yes/no question for ``assert eventually(...)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

WAIT_S = 20.0  # what a message through a broker and into the database may take here
POLL_S = 0.05


def wait_for(
    what: str, probe: Callable[[], T | None], timeout_s: float = 30.0, poll_s: float = POLL_S
) -> T:
    """The first truthy value of ``probe()``; an AssertionError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


def eventually(predicate: Callable[[], Any], timeout_s: float = WAIT_S) -> bool:
    """Whether ``predicate()`` holds before the deadline (asked once more at the end)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(POLL_S)
    return bool(predicate())
