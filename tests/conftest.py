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

TIERS = ("gpu", "slow")


def pytest_configure(config):
    on_cpu = os.environ.get("VAR_GPU_TESTS_ON_CPU") in ("1", "all")
    compiled = "gpu" in (config.getoption("markexpr") or "") and torch.cuda.is_available() and not on_cpu
    if not compiled:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("markexpr") or ""
    cuda = torch.cuda.is_available() or os.environ.get("VAR_GPU_TESTS_ON_CPU") in ("1", "all")
    for item in items:
        for tier in TIERS:
            if item.get_closest_marker(tier) is None:
                continue
            if tier not in markexpr:  # the -m expression decides whenever it names the tier
                item.add_marker(pytest.mark.skip(reason=f"{tier} tier is off by default: run with -m {tier}"))
            elif tier == "gpu" and not cuda:
                item.add_marker(pytest.mark.skip(reason="gpu tier needs CUDA (torch.cuda.is_available() is False)"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
