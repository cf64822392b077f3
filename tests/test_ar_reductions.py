"""Knob reductions that must hold token for token: LANTERN delta = 0 and GSD group 1 are SJD; ZipAR with a
window as wide as the image is plain next-token decoding. Also the relaxed rules' bounds and sanity."""
import pytest
import torch

from var.errors import ConfigError
from helpers import tiny_gpt
from var.models import create
from var.samplers.jacobi import (ExactAcceptance, GroupedAcceptance, LanternAcceptance, sample_gsd, sample_lantern,
                                 sample_sjd)
from var.samplers.neighbor import sample_zipar
from var.samplers.next_token import sample_next_token


@pytest.fixture(scope="module")
def pair():
    return tiny_gpt(), create("vq_tiny").eval()


KNOBS = dict(cfg_scale=2.0, top_k=20, top_p=0.95, temperature=1.1)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_lantern_delta0_and_gsd_group1_equal_sjd(pair, seed):
    gpt, vq = pair
    labels = torch.tensor([0, 4, 9, 10, 2, 2])
    for kwargs in (dict(window=6), dict(window=4, coupling="maximal", init="repeat_horizon")):
        ref = sample_sjd(gpt, None, labels, generator=_gen(seed), **KNOBS, **kwargs)
        lantern = sample_lantern(gpt, vq, labels, generator=_gen(seed), delta=0.0, k=16, **KNOBS, **kwargs)
        gsd = sample_gsd(gpt, vq, labels, generator=_gen(seed), group_size=1, **KNOBS, **kwargs)
        assert torch.equal(lantern.tokens, ref.tokens) and torch.equal(gsd.tokens, ref.tokens)
        assert lantern.stats.forward_passes == ref.stats.forward_passes == gsd.stats.forward_passes


def test_lantern_relaxation_is_bounded_and_only_raises_acceptance():
    g = _gen(0)
    p = torch.softmax(torch.randn(3, 5, 32, generator=g), -1)
    q = torch.softmax(torch.randn(3, 5, 32, generator=g), -1)
    x = torch.multinomial(q.view(-1, 32), 1, generator=g).view(3, 5)
    exact, _ = ExactAcceptance().ratio_and_residual(p, q, x)
    rule = LanternAcceptance(torch.randn(32, 4, generator=g), k=8, delta=0.2)
    ratio, residual = rule.ratio_and_residual(p, q, x)
    assert torch.all(ratio >= exact - 1e-6) and torch.all(residual >= 0)
    relaxed = rule.relaxed(p, x)
    torch.testing.assert_close(relaxed.sum(-1), torch.ones(3, 5))
    assert torch.all((relaxed - p).abs().sum(-1) / 2 <= 0.2 + 1e-6)  # TV(p, p~) <= delta


def test_gsd_cluster_ratio_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    q = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    x = torch.tensor([1])
    ratio = lambda rule: rule.ratio_and_residual(p, q, x)[0].item()  # noqa: E731
    assert ratio(GroupedAcceptance(1)) == pytest.approx(0.3)
    assert ratio(GroupedAcceptance(3, prob_gap=1.0)) == pytest.approx(1.0)   # C = {0, 1, 2}
    assert ratio(GroupedAcceptance(3, prob_gap=0.15)) == pytest.approx(0.5)  # 0 is too far in probability
    embed = torch.tensor([[0.0], [0.0], [5.0], [0.0]])
    assert ratio(GroupedAcceptance(3, prob_gap=1.0, embed_VD=embed, embed_threshold=0.5)) == pytest.approx(0.8)


def test_bad_knobs_raise():
    codes = torch.randn(8, 2)
    with pytest.raises(ConfigError):
        LanternAcceptance(codes, delta=1.5)
    with pytest.raises(ConfigError):
        GroupedAcceptance(0)
    gpt = create("gpt_tiny").eval()
    with pytest.raises(ConfigError):
        sample_sjd(gpt, None, [1], window=0)
    with pytest.raises(ConfigError):
        sample_sjd(gpt, None, [1], init="diagonal")
    with pytest.raises(ConfigError):
        sample_lantern(gpt, None, [1])  # no tokenizer, no codes
    assert sample_next_token(gpt, None, [1]).tokens.shape == (1, 16)


def test_zipar_full_window_is_next_token_and_steps_follow_the_schedule():
    gpt = tiny_gpt(grid_size=5)
    labels = torch.tensor([1, 5, 10])
    for seed in (0, 1):
        ref = sample_next_token(gpt, None, labels, generator=_gen(seed), **KNOBS)
        zip_full = sample_zipar(gpt, None, labels, window=5, generator=_gen(seed), **KNOBS)
        assert torch.equal(zip_full.tokens, ref.tokens)
        assert zip_full.stats.forward_passes == ref.stats.forward_passes == 25
    for s in (1, 2, 4):
        out = sample_zipar(gpt, None, labels, window=s, generator=_gen(0), **KNOBS)
        assert out.stats.forward_passes == 5 + 4 * s and out.tokens.shape == (3, 25)
    default = sample_zipar(gpt, None, labels, generator=_gen(0), **KNOBS)  # half the width: s = 5 // 2 = 2
    assert torch.equal(default.tokens, sample_zipar(gpt, None, labels, window=2, generator=_gen(0), **KNOBS).tokens)
    assert default.stats.forward_passes == 5 + 4 * 2
    for bad in (0, 6):
        with pytest.raises(ConfigError):
            sample_zipar(gpt, None, labels, window=bad)


def test_gsd_released_rank_window():
    """The release's cluster: the 6 likelier and the 7 less likely tokens around x in p's order (its slice
    ``[i - 7, i + 7)`` of the ascending order), before the probability and embedding filters."""
    from var.samplers.jacobi import GSD_RELEASED_RANKS
    V = 20
    p = torch.softmax(-torch.arange(V, dtype=torch.float) * 0.01, -1)[None]  # descending order = index order
    x = torch.tensor([10])
    q = torch.nn.functional.one_hot(x, V).float()
    ratio = GroupedAcceptance(None, prob_gap=1.0).ratio_and_residual(p, q, x)[0]
    assert GSD_RELEASED_RANKS == (6, 7)
    assert ratio.item() == pytest.approx(p[0, 4:18].sum().item())  # ranks 4..17 = 10-6 .. 10+7
    assert GroupedAcceptance(3, prob_gap=1.0).ratio_and_residual(p, q, x)[0].item() == pytest.approx(
        p[0, 9:12].sum().item())


def test_gsd_threshold_calibration_from_the_embedding_table():
    from var.samplers.jacobi import gsd_embed_threshold
    embed = torch.randn(200, 8, generator=_gen(0))
    dist = torch.cdist(embed, embed).pow(2)
    pairs = dist[~torch.eye(200, dtype=torch.bool)]
    for fraction in (0.01, 0.05, 0.3):
        threshold = gsd_embed_threshold(embed, fraction)
        assert (pairs <= threshold).float().mean().item() == pytest.approx(fraction, abs=0.002)
    with pytest.raises(ConfigError):
        gsd_embed_threshold(embed, 1.5)
