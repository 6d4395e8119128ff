"""The GPU paths: the decode fast path (engine.py), experts offloaded to pinned host memory under a GPU budget
(offload.py), and routing overrides and synthetic routing traces for both (traces.py)."""
