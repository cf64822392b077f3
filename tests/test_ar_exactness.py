"""Exactness of the speculative samplers, statistically, against the enumerated joint distribution.

A tiny GPT (vocabulary 4, 2 x 2 tokens) has 4^4 = 256 possible images. Its exact joint distribution under CFG,
temperature and top-k/top-p is computed by teacher forcing every sequence (processing written out here, not
taken from the samplers). Each sampler draws 3000 samples in one batch (so samples accept different lengths),
and a chi-square goodness-of-fit test at significance 0.001 must not reject. Seeds are fixed, so the outcome is
deterministic; a deliberately biased sampler (LANTERN with a large delta) must be rejected by the same test.
"""
import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from var.models import GPT, GPTConfig
from var.samplers.jacobi import sample_gsd, sample_lantern, sample_mcsjd, sample_sjd
from var.samplers.next_token import sample_next_token

ALPHA = 1e-3
NUM_SAMPLES = 3000
V, GRID = 4, 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    gpt = GPT(GPTConfig(dim=32, n_layer=2, n_head=2, multiple_of=16, num_classes=3, vocab_size=V, grid_size=GRID))
    torch.nn.init.normal_(gpt.output.weight, std=0.6)
    torch.nn.init.normal_(gpt.tok_embeddings.weight, std=1.0)
    return gpt.eval()


def exact_distribution(model, label, cfg_scale, temperature, top_k, top_p):
    """``{sequence: probability}`` by teacher forcing all V^N sequences."""
    seqs = torch.tensor(list(itertools.product(range(V), repeat=GRID * GRID)))
    with torch.no_grad():
        cond = model(torch.full((len(seqs),), label), seqs)
        uncond = model(torch.full((len(seqs),), model.null_class), seqs)
    logits = (uncond + cfg_scale * (cond - uncond)) / temperature
    if top_k:
        kth = logits.sort(dim=-1, descending=True).values[..., top_k - 1:top_k]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p:
        probs = logits.softmax(-1)
        sorted_p, order = probs.sort(dim=-1, descending=False)
        drop_sorted = sorted_p.cumsum(-1) <= 1 - top_p
        drop_sorted[..., -1] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), -math.inf)
    logp = logits.log_softmax(-1).gather(-1, seqs[..., None])[..., 0].sum(-1)
    return {tuple(s.tolist()): p for s, p in zip(seqs, logp.exp().tolist())}


def chi_square_pvalue(tokens, exact):
    counts = {}
    for row in tokens.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert all(exact[s] > 0 for s in counts), "sampled a sequence of probability zero"
    n = tokens.shape[0]
    cells = sorted(exact, key=exact.get, reverse=True)
    observed, expected, pool_o, pool_e = [], [], 0, 0.0
    for s in cells:  # pool the cells with fewer than 5 expected samples into one
        if exact[s] * n >= 5:
            observed.append(counts.get(s, 0))
            expected.append(exact[s] * n)
        else:
            pool_o, pool_e = pool_o + counts.get(s, 0), pool_e + exact[s] * n
    if pool_e > 0:
        observed.append(pool_o)
        expected.append(pool_e)
    scale = sum(observed) / sum(expected)
    return chisquare(observed, [e * scale for e in expected]).pvalue


SETTINGS = dict(cfg_scale=2.0, temperature=1.3, top_k=3, top_p=0.0)


@pytest.mark.parametrize("name, sampler, kwargs", [
    ("next_token", sample_next_token, {}),
    ("sjd_random", sample_sjd, dict(window=3, init="random")),
    ("sjd_horizon_w8", sample_sjd, dict(window=8, init="repeat_horizon")),
    ("mcsjd_maximal", sample_mcsjd, dict(window=3, coupling="maximal")),
    ("mcsjd_gumbel", sample_mcsjd, dict(window=4, coupling="gumbel", init="repeat_vertical")),
])
def test_sampler_matches_exact_distribution(model, name, sampler, kwargs):
    exact = exact_distribution(model, 1, **SETTINGS)
    out = sampler(model, None, torch.full((NUM_SAMPLES,), 1), generator=torch.Generator().manual_seed(11),
                  **SETTINGS, **kwargs)
    p = chi_square_pvalue(out.tokens, exact)
    assert p > ALPHA, f"{name}: chi-square p = {p:.2e} (samples do not follow the exact distribution)"
    if name != "next_token":
        assert out.stats.forward_passes < 1 + GRID * GRID or max(out.stats.extra["accepted_histogram"][2:]) > 0


def test_top_p_and_no_guidance_exact(model):
    settings = dict(cfg_scale=1.0, temperature=1.3, top_k=0, top_p=0.9)
    exact = exact_distribution(model, 2, **settings)
    out = sample_mcsjd(model, None, torch.full((NUM_SAMPLES,), 2), generator=torch.Generator().manual_seed(5),
                       window=4, coupling="maximal", **settings)
    assert chi_square_pvalue(out.tokens, exact) > ALPHA


def test_chi_square_detects_biased_samplers(model):
    """Power check: LANTERN (large delta) and GSD (large groups), approximate by design, are rejected."""
    exact = exact_distribution(model, 1, **SETTINGS)
    labels, gen = torch.full((NUM_SAMPLES,), 1), torch.Generator().manual_seed(11)
    codes = torch.randn(V, 3, generator=torch.Generator().manual_seed(0))
    out = sample_lantern(model, None, labels, generator=gen, codes_VD=codes, k=3, delta=0.5, window=3, **SETTINGS)
    assert chi_square_pvalue(out.tokens, exact) < ALPHA
    out = sample_gsd(model, None, labels, generator=gen, group_size=8, prob_gap=1.0, embed_threshold=None,
                     window=3, **SETTINGS)
    assert chi_square_pvalue(out.tokens, exact) < ALPHA


def test_greedy_sjd_equals_greedy_next_token():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(dim=64, n_layer=2, n_head=4, multiple_of=32, num_classes=10, vocab_size=64, grid_size=6))
    torch.nn.init.normal_(gpt.output.weight, std=0.5)
    gpt.eval()
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
        exact = exact_distribution(model, label, **SETTINGS)
        assert chi_square_pvalue(out.tokens[labels == label], exact) > ALPHA
