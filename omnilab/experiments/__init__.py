"""Experiments on a loaded model: corpus traces (trace.py), recording routing (routing_trace.py), routing statistics
(routing.py), cache simulation replaying the cache's own policies (cache_sim.py), eval sets (eval_data.py),
measures (measures.py), the generation sweep (sweeps.py), what masking costs (masking.py), the fault gallery
(fault_gallery.py)."""
