"""Publishing a release.

Validation, the TUF repository and keys, golden sets and precomputed deltas.
"""
