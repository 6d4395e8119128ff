"""omnilab: a workbench for huge Mixture-of-Experts checkpoints (Qwen3-Omni-30B-A3B, Qwen3-MoE).

Open a checkpoint without reading its weights, account for every tensor, run it with only the experts the
router picks under a memory budget, and compare it with transformers at every hook point.
"""

from omnilab.checkpoint import Checkpoint, CheckpointError, Problem

__version__ = "0.1.0"
__all__ = ["Checkpoint", "CheckpointError", "Problem", "__version__"]
