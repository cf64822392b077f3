"""The opt-in test tiers (markers registered in pytest.ini), applied by tests/conftest.py."""
import os

import pytest
import torch

TIERS = ("gpu", "slow")


def gpu_tests_on_cpu() -> bool:
    """``VAR_GPU_TESTS_ON_CPU=1|all``: run the gpu tier's bodies on the CPU (dry run, see tests/gpu/conftest.py)."""
    return os.environ.get("VAR_GPU_TESTS_ON_CPU") in ("1", "all")


def skip_off_tiers(config, items):
    """Skip tiered tests unless ``-m`` names their tier; gpu tests also need CUDA (or the CPU dry run)."""
    markexpr = config.getoption("markexpr") or ""
    cuda = torch.cuda.is_available() or gpu_tests_on_cpu()
    for item in items:
        for tier in TIERS:
            if item.get_closest_marker(tier) is None:
                continue
            if tier not in markexpr:  # the -m expression decides whenever it names the tier
                item.add_marker(pytest.mark.skip(reason=f"{tier} tier is off by default: run with -m {tier}"))
            elif tier == "gpu" and not cuda:
                item.add_marker(pytest.mark.skip(reason="gpu tier needs CUDA (torch.cuda.is_available() is False)"))
