"""Test configuration: deterministic seeds, Triton kernels interpreted on the CPU, opt-in test tiers.

Triton's mode is fixed per process when the kernel module is first imported, so it is chosen per run: the gpu tier
on a CUDA machine runs the compiled kernels; every other run sets ``TRITON_INTERPRET=1`` (unless already set), so
the interpreter tests of the CPU tier run on CPU tensors, on a CUDA machine too.

Tiers: tests marked ``gpu`` or ``slow`` (markers registered in pytest.ini) are skipped unless the ``-m``
expression names the tier (``pytest -m gpu``, ``pytest -m slow``, ``pytest -m "slow or not slow"``); ``gpu``
tests are also skipped, cleanly, when CUDA is not available, unless ``VAR_GPU_TESTS_ON_CPU=1`` asks for their
dry run on the CPU (tests/gpu/conftest.py then hands them the CPU as ``device``).
"""
import os

import pytest
import torch

from tiers import gpu_tests_on_cpu, skip_off_tiers


def pytest_configure(config):
    on_cpu = gpu_tests_on_cpu()
    compiled = "gpu" in (config.getoption("markexpr") or "") and torch.cuda.is_available() and not on_cpu
    if not compiled:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_off_tiers(config, items)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
