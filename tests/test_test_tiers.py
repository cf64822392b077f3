"""The opt-in test tiers of tests/conftest.py: ``gpu`` and ``slow`` tests run only when ``-m`` names them."""
import pytest
import torch

import tiers
from tiers import skip_off_tiers


class _Item:
    def __init__(self, *markers):
        self.markers, self.added = set(markers), []

    def get_closest_marker(self, name):
        return name if name in self.markers else None

    def add_marker(self, mark):
        self.added.append(mark.kwargs["reason"])


class _Config:
    def __init__(self, markexpr):
        self.markexpr = markexpr

    def getoption(self, name):
        assert name == "markexpr"
        return self.markexpr


def _skips(markexpr, *markers):
    item = _Item(*markers)
    skip_off_tiers(_Config(markexpr), [item])
    return item.added


@pytest.mark.parametrize("tier", ["gpu", "slow"])
def test_tiers_are_off_by_default(tier):
    assert _skips("", tier) == [f"{tier} tier is off by default: run with -m {tier}"]
    assert _skips("not gpu", "slow") and _skips("not slow", "gpu")  # naming the other tier does not opt in
    assert _skips("") == [] and _skips("not slow") == []  # untiered tests always run


def test_tiers_opt_in():
    assert _skips("slow", "slow") == [] and _skips("slow or not slow", "slow") == []
    gpu = _skips("gpu", "gpu")
    assert gpu == ([] if torch.cuda.is_available() or tiers.gpu_tests_on_cpu() else ["gpu tier needs CUDA (torch.cuda.is_available() is False)"])


@pytest.mark.slow
def test_slow_probe_runs_only_when_selected(request):
    assert "slow" in request.config.getoption("markexpr")


@pytest.mark.gpu
def test_gpu_probe_runs_only_with_cuda(request):
    assert "gpu" in request.config.getoption("markexpr") and torch.cuda.is_available()
