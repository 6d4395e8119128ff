"""The runtime: the one place that decides which engine runs a call, for every face (CLI, `ol`, experiments, notebooks).

- `hardware.py`: what this machine offers (devices, free GPU and host memory, cores) and the "auto" defaults of
  `device`, `dtype` and `expert_budget`.
- `choose.py`: `choose(model, call)`: the fastest exact engine for a model and a call, and why each faster one was
  refused.
- `generate.py`: `generate(model, prompts, ...)` through the chosen engine; the result names the engine.
- `model.py`: the selective model as the faces meet it (`ol.load`, `ol.SelectiveMoE`): `auto` defaults, and
  `generate` through the runtime.
- `plan.py`: `omnilab plan`: which engine each verb would take on a machine, the bytes of each tier, and the
  decode speed to expect from measured bandwidths.
"""
