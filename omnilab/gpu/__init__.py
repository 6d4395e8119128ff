"""The GPU paths, one job a module (imports go down this list):
- fused_moe.py: the expert mix as fused Triton kernels (`fused_expert_mix`; imported by step.py for compute="triton");
- step_kernels.py: the batch-1 step's GEMVs and top-k as Triton kernels (`linear`, `linear_qkv`, `route_topk`;
  imported by step.py for decode-sized bf16 steps under compute="triton");
- step.py: the tensor-only decode step (static KV cache, attention, router, grouped expert mix);
- slots.py: pools of expert slots on the device (`SlotPool` stacked, `SlabPool` one slab per layer);
- host.py: the host tier of offloaded experts (`HostTier`), its byte spans and the driver copy (`DriverCopy`);
- slot_cache.py: which experts the slots hold: a per-layer eviction policy, prefetch, statistics (`SlotCache`);
- phases.py: the offloaded step's phase timer (`PhaseTimer`, `PHASES`);
- sampling.py: device-side warpers and a hashed Gumbel-max draw (`SamplingParams`, `warp`, `draw`);
- fast.py: the all-resident decode fast path (`FastDecoder`, `generate`, `fast_path_refusal`);
- segments.py: the offloaded step's segment kernels, plain tensor functions (`expert_choice`, `mix_sum`, ...);
- offload_step.py: the offloaded decode step as segments, their CUDA graphs and host loop (`SegmentedStep`);
- offload.py: offloaded decoding under a GPU budget (`OffloadDecoder`: slots and copies, eager step, generate);
- prefill_kernels.py: the trace prefill's glue as Triton kernels (`rms_norm`, `add_rms_norm`, `norm_rope`, `silu_mul`,
  `combine_into`; imported by prefill.py for glue="triton");
- prefill.py: the grouped trace prefill (`TracePrefill`, `prefill_refusal`, `prefill_glue`).
"""
