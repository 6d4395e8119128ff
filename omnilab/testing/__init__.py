"""Checkpoints for tests and notebooks: tiny and full-scale synthesized ones (synth.py), and copies broken the
ways hand extraction breaks them (breakage.py); synthetic routing traces with stated reuse (traces.py)."""
