"""What the agent measures.

Latency histograms, telemetry windows, power and thermal sensors and their sampler.
"""
