"""Experiments on a loaded model: routing statistics (routing.py), cache simulation replaying the cache's own
policies (cache_sim.py), eval sets (eval_data.py), measures (measures.py), the generation sweep (sweeps.py), what
masking costs (masking.py), the fault gallery (fault_gallery.py), modality routing (modality/: the prompts in
three forms and their run, prompts.py; the statistics by modality and the masking experiment, analysis.py).
Corpus traces are their own room, omnilab/trace/."""
