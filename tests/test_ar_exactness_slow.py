"""Stronger exactness evidence (slow tier, ``pytest -m slow``): a 3 x 3 grid (3^9 = 19,683 images) and 60,000
samples per sampler against the enumerated joint distribution; plus a mutation test showing that the fast CI test
(2 x 2 grid, 3,000 samples, tests/test_ar_exactness.py) rejects an injected bias in SJD's random numbers."""
import itertools
import math

import pytest
import torch
from scipy.stats import chisquare

from var.models import GPT, GPTConfig
from var.samplers import jacobi
from var.samplers.jacobi import sample_mcsjd, sample_sjd
from var.samplers.next_token import sample_next_token

ALPHA = 1e-3
SETTINGS = dict(cfg_scale=2.0, temperature=1.3, top_k=2, top_p=0.0)


def tiny_gpt(vocab, grid):
    torch.manual_seed(3)
    gpt = GPT(GPTConfig(dim=32, n_layer=2, n_head=2, multiple_of=16, num_classes=3, vocab_size=vocab,
                        grid_size=grid))
    torch.nn.init.normal_(gpt.output.weight, std=0.6)
    torch.nn.init.normal_(gpt.tok_embeddings.weight, std=1.0)
    return gpt.eval()


def exact_distribution(model, label, vocab, grid, cfg_scale, temperature, top_k, top_p):
    """``{sequence: probability}`` by teacher forcing all ``vocab^(grid^2)`` sequences (top-k only, written out)."""
    assert top_p == 0.0
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=grid * grid)))
    logp = []
    with torch.no_grad():
        for chunk in seqs.split(4096):
            cond = model(torch.full((len(chunk),), label), chunk)
            uncond = model(torch.full((len(chunk),), model.null_class), chunk)
            logits = (uncond + cfg_scale * (cond - uncond)) / temperature
            if top_k:
                kth = logits.sort(dim=-1, descending=True).values[..., top_k - 1:top_k]
                logits = logits.masked_fill(logits < kth, -math.inf)
            logp.append(logits.log_softmax(-1).gather(-1, chunk[..., None])[..., 0].sum(-1))
    return {tuple(s.tolist()): p for s, p in zip(seqs, torch.cat(logp).exp().tolist())}


def chi_square_pvalue(tokens, exact):
    counts = {}
    for row in tokens.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert all(exact[s] > 0 for s in counts), "sampled a sequence of probability zero"
    n = tokens.shape[0]
    observed, expected, pool_o, pool_e = [], [], 0, 0.0
    for s in sorted(exact, key=exact.get, reverse=True):  # cells with < 5 expected samples pooled into one
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
    model = tiny_gpt(vocab, grid)
    exact = exact_distribution(model, 1, vocab, grid, **SETTINGS)
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
    model = tiny_gpt(vocab, grid)
    exact = exact_distribution(model, 1, vocab, grid, **SETTINGS)
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
