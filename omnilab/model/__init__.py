"""The selective model: the decoder and its forward (decoder.py), RoPE (rope.py), the KV cache (kv_cache.py),
loading it from a checkpoint (loading.py), generation with it (generate.py), the routing options it is given
(routing.py), experts and the cache that holds them with every eviction policy (experts.py), the table of hook
names with capture and compare (hooks.py), faults a hand-built loader hits (faults.py), and multimodal input
through transformers' towers (multimodal.py)."""
