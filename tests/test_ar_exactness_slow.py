"""Stronger exactness evidence (slow tier, ``pytest -m slow``): a 3 x 3 grid (3^9 = 19,683 images) and 60,000
samples per sampler against the enumerated joint distribution; plus a mutation test showing that the fast CI test
(2 x 2 grid, 3,000 samples, tests/test_ar_exactness.py) rejects an injected bias in SJD's random numbers."""
import pytest
import torch

from helpers import chi_square_pvalue, class_rows, exact_distribution, exactness_gpt
from var.samplers import jacobi
from var.samplers.jacobi import sample_mcsjd, sample_sjd
from var.samplers.next_token import sample_next_token

ALPHA = 1e-3
SETTINGS = dict(cfg_scale=2.0, temperature=1.3, top_k=2, top_p=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("name, sampler, kwargs", [
    ("next_token", sample_next_token, {}),
    ("sjd_random", sample_sjd, dict(window=4)),
    ("sjd_horizon", sample_sjd, dict(window=6, init="repeat_horizon")),
    ("mcsjd_maximal", sample_mcsjd, dict(window=5, coupling="maximal")),
    ("mcsjd_gumbel", sample_mcsjd, dict(window=4, coupling="gumbel", init="repeat_vertical")),
])
def test_3x3_grid_60000_samples(name, sampler, kwargs):
    vocab, grid, num_samples = 3, 3, 60_000
    model = exactness_gpt(vocab, grid)
    exact = exact_distribution(model, class_rows(model, 1), **SETTINGS)
    tokens = torch.cat([sampler(model, None, torch.full((10_000,), 1), decode=False, **SETTINGS, **kwargs,
                                generator=torch.Generator().manual_seed(100 + part)).tokens for part in range(6)])
    assert tokens.shape[0] == num_samples
    p = chi_square_pvalue(tokens, exact)
    assert p > ALPHA, f"{name}: chi-square p = {p:.2e} on 60,000 samples"


MUTATIONS = {
    # after a rejection, resample from p instead of the residual max(0, p - q): the draft is over-weighted
    "residual_without_q": lambda: _patch_rule(lambda p, q, x, ratio, residual: (ratio, p)),
    # accept with the square root of the ratio (a too lenient test)
    "lenient_acceptance": lambda: _patch_rule(lambda p, q, x, ratio, residual: (ratio.sqrt(), residual)),
}


def _patch_rule(mutate):
    original = jacobi.ExactAcceptance.ratio_and_residual

    def mutated(self, p, q, x):
        ratio, residual = original(self, p, q, x)
        return mutate(p, q, x, ratio, residual)
    return mutated


def _reuse_acceptance_uniform(monkeypatch):
    """The residual resample reuses the acceptance test's uniform (after a rejection it is known to be >= the
    ratio): a random-number-reuse bug."""
    original = jacobi.PassUniforms.draw.__func__

    def reused(cls, batch, window, generator, device):
        u = original(cls, batch, window, generator, device)
        u.residual_BL = u.accept_BL
        return u
    monkeypatch.setattr(jacobi.PassUniforms, "draw", classmethod(reused))


def _fast_test_pvalue():
    """The fast CI test's setting: 2 x 2 grid, vocabulary 4, 3,000 samples in one batch."""
    vocab, grid = 4, 2
    model = exactness_gpt(vocab, grid)
    exact = exact_distribution(model, class_rows(model, 1), **SETTINGS)
    tokens = sample_sjd(model, None, torch.full((3000,), 1), window=3, decode=False, **SETTINGS,
                        generator=torch.Generator().manual_seed(11)).tokens
    return chi_square_pvalue(tokens, exact)


def test_fast_test_passes_the_unmutated_sampler():
    assert _fast_test_pvalue() > ALPHA


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_fast_test_rejects_injected_biases(monkeypatch, mutation):
    monkeypatch.setattr(jacobi.ExactAcceptance, "ratio_and_residual", MUTATIONS[mutation]())
    assert _fast_test_pvalue() < ALPHA


def test_fast_test_misses_random_number_reuse(monkeypatch):
    """Documented limit of the fast test (why the slow tier exists): reusing the acceptance uniform for the
    residual resample is not detected on 3,000 samples of a 2 x 2 grid."""
    _reuse_acceptance_uniform(monkeypatch)
    assert _fast_test_pvalue() > ALPHA
