"""Getting a signed model onto the device.

The state machine, TUF trust, download, A/B slots, smoke test.
"""
