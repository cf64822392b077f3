"""GPU tier fixtures. ``device`` is CUDA; with ``VAR_GPU_TESTS_ON_CPU=1`` (the dry run of scripts/gpu_suite.sh)
the same test bodies run on the CPU, kernels under the Triton interpreter, so the tier is exercised without a GPU:
the first parametrization of each test only (``VAR_GPU_TESTS_ON_CPU=all``: every one)."""
import os

import pytest
import torch

from tiers import gpu_tests_on_cpu

ON_CPU = gpu_tests_on_cpu()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("VAR_GPU_TESTS_ON_CPU") != "1":
        return
    seen, keep, drop = set(), [], []
    for item in items:
        key = (str(item.path), getattr(item, "originalname", item.name))
        (drop if key in seen else keep).append(item)
        seen.add(key)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cpu" if ON_CPU else "cuda")


@pytest.fixture()
def gen(device):
    """``gen(seed)``: a generator on the test device (a CUDA generator on CUDA)."""
    return lambda seed=0: torch.Generator(device).manual_seed(seed)
