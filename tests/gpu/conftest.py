"""GPU tests: not collected without CUDA (CI has none). Run them on a GPU machine with `bash scripts/gpu_tests.sh`
(its outcome is committed under bench/results/gpu_tests.md with the command)."""

import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]
