"""GPU tests: skipped without CUDA. Run them on a GPU machine with `bash scripts/gpu_tests.sh` (its outcome is
committed under bench/results/gpu_tests.md with the command)."""

import pytest
import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        for item in items:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
