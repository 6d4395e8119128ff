"""Architecture families: config.json -> a config dataclass and the tensor names it implies.

One file per family. Qwen3-MoE and the Qwen3-Omni thinker are one family (qwen3_moe.py) with two layouts.
"""

from omnilab.arch.qwen3_moe import (ALL_COMPONENTS, EXPERT_PROJECTIONS, QWEN3_MOE, ConfigInsane, QWEN3_OMNI, TEXT_COMPONENTS, TOWERS, Layout, Qwen3MoeConfig, TensorSpec, classify, expected_tensors, expert_tensor, read_config)

__all__ = [
    "ALL_COMPONENTS", "ConfigInsane", "EXPERT_PROJECTIONS", "QWEN3_MOE", "QWEN3_OMNI", "TEXT_COMPONENTS", "TOWERS", "Layout",
    "Qwen3MoeConfig", "TensorSpec", "classify", "expected_tensors", "expert_tensor", "read_config",
]
