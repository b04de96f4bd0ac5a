"""Fleet telemetry.

The rollup writer, its SQL, pure rollup values, latency sketches, metrics, bandwidth.
"""
