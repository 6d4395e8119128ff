"""What the selective model is checked against: the whole transformers model (whole.py), transformers' modules
streamed one layer at a time (streamed.py), the chained / local comparison in bounded memory (compare.py), and
the multimodal comparison (multimodal.py)."""
