"""Exactness of the speculative samplers, statistically, against the enumerated joint distribution.

A tiny GPT (vocabulary 4, 2 x 2 tokens) has 4^4 = 256 possible images. Its exact joint distribution under CFG,
temperature and top-k/top-p is computed by teacher forcing every sequence (helpers.exact_distribution: the
processing written out, not taken from the samplers). Each sampler draws 3000 samples in one batch (so samples
accept different lengths), and a chi-square goodness-of-fit test at significance 0.001 must not reject. Seeds are
fixed, so the outcome is deterministic; a deliberately biased sampler (LANTERN with a large delta) must be
rejected by the same test.
"""
import pytest
import torch

from helpers import chi_square_pvalue, class_rows, exact_distribution, exactness_gpt, tiny_gpt
from var.samplers.jacobi import sample_gsd, sample_lantern, sample_mcsjd, sample_sjd
from var.samplers.next_token import sample_next_token

ALPHA = 1e-3
NUM_SAMPLES = 3000
V, GRID = 4, 2


@pytest.fixture(scope="module")
def model():
    return exactness_gpt(V, GRID)


SETTINGS = dict(cfg_scale=2.0, temperature=1.3, top_k=3, top_p=0.0)


@pytest.mark.parametrize("name, sampler, kwargs", [
    ("next_token", sample_next_token, {}),
    ("sjd_random", sample_sjd, dict(window=3, init="random")),
    ("sjd_horizon_w8", sample_sjd, dict(window=8, init="repeat_horizon")),
    ("mcsjd_maximal", sample_mcsjd, dict(window=3, coupling="maximal")),
    ("mcsjd_gumbel", sample_mcsjd, dict(window=4, coupling="gumbel", init="repeat_vertical")),
])
def test_sampler_matches_exact_distribution(model, name, sampler, kwargs):
    exact = exact_distribution(model, class_rows(model, 1), **SETTINGS)
    out = sampler(model, None, torch.full((NUM_SAMPLES,), 1), generator=torch.Generator().manual_seed(11),
                  **SETTINGS, **kwargs)
    p = chi_square_pvalue(out.tokens, exact)
    assert p > ALPHA, f"{name}: chi-square p = {p:.2e} (samples do not follow the exact distribution)"
    if name != "next_token":
        assert out.stats.forward_passes < 1 + GRID * GRID or max(out.stats.extra["accepted_histogram"][2:]) > 0


def test_top_p_and_no_guidance_exact(model):
    settings = dict(cfg_scale=1.0, temperature=1.3, top_k=0, top_p=0.9)
    exact = exact_distribution(model, class_rows(model, 2), **settings)
    out = sample_mcsjd(model, None, torch.full((NUM_SAMPLES,), 2), generator=torch.Generator().manual_seed(5),
                       window=4, coupling="maximal", **settings)
    assert chi_square_pvalue(out.tokens, exact) > ALPHA


def test_chi_square_detects_biased_samplers(model):
    """Power check: LANTERN (large delta) and GSD (large groups), approximate by design, are rejected."""
    exact = exact_distribution(model, class_rows(model, 1), **SETTINGS)
    labels, gen = torch.full((NUM_SAMPLES,), 1), torch.Generator().manual_seed(11)
    codes = torch.randn(V, 3, generator=torch.Generator().manual_seed(0))
    out = sample_lantern(model, None, labels, generator=gen, codes_VD=codes, k=3, delta=0.5, window=3, **SETTINGS)
    assert chi_square_pvalue(out.tokens, exact) < ALPHA
    out = sample_gsd(model, None, labels, generator=gen, group_size=8, prob_gap=1.0, embed_threshold=None,
                     window=3, **SETTINGS)
    assert chi_square_pvalue(out.tokens, exact) < ALPHA


def test_greedy_sjd_equals_greedy_next_token():
    gpt = tiny_gpt(output_std=0.5, grid_size=6)
    labels = torch.tensor([0, 3, 7, 10])
    ref = sample_next_token(gpt, None, labels, cfg_scale=3.0, top_k=1, generator=torch.Generator().manual_seed(0))
    for kwargs in (dict(window=16), dict(window=5, init="repeat_horizon"), dict(window=8, coupling="maximal"),
                   dict(window=7, coupling="gumbel", init="repeat_vertical")):
        out = sample_sjd(gpt, None, labels, cfg_scale=3.0, top_k=1, generator=torch.Generator().manual_seed(1),
                         **kwargs)
        assert torch.equal(out.tokens, ref.tokens), kwargs
        assert out.stats.tokens == 36 and out.stats.forward_passes <= 36


def test_mixed_labels_in_one_batch_each_follow_their_class(model):
    """Rows of different classes (different accepted lengths and targets) share passes and the K/V cache."""
    labels = torch.tensor([0, 2] * 2000)
    out = sample_sjd(model, None, labels, generator=torch.Generator().manual_seed(7), window=3, **SETTINGS)
    for label in (0, 2):
        exact = exact_distribution(model, class_rows(model, label), **SETTINGS)
        assert chi_square_pvalue(out.tokens[labels == label], exact) > ALPHA
