"""Exact, path and attribution patching: one engine and the sweeps, path patching and first-order estimates built on it."""
