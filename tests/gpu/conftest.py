"""GPU tests: not collected without CUDA (CI has none). Run them on a GPU machine with `bash scripts/gpu_tests.sh`
(its outcome is committed under bench/results/gpu_tests.md with the command)."""

import pytest
import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]


@pytest.fixture
def no_tf32():
    """fp32 references (F.linear, gather's bmm) multiply in true fp32, not tf32, for the test that asks."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved
