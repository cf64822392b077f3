"""LANTERN's guarantee, as var claims it: with one-hot drafts every token is within total variation ``delta`` of
the exact distribution; with SJD's carried-over ``q`` no such bound holds (so var records LANTERN drafts one-hot).
The output distribution of one position is computed in closed form from the rule's ratio and residual."""
import pytest
import torch

from helpers import tiny_gpt
from var.models import create
from var.samplers import jacobi
from var.samplers.jacobi import LanternAcceptance, sample_lantern

V = 32


def output_distribution(rule, p, q):
    """Distribution of the token a position commits when its draft is drawn from ``q`` (``[V]`` each)."""
    out = torch.zeros(V, dtype=torch.float64)
    for x in range(V):
        if q[x] == 0:
            continue
        xs = torch.tensor([x])
        ratio, residual = rule.ratio_and_residual(p[None], q[None], xs)
        accept = ratio.clamp(max=1.0).double()[0]
        res = residual[0].double()
        res = res / res.sum() if res.sum() > 0 else p.double()
        out += q[x].double() * (accept * torch.nn.functional.one_hot(xs, V)[0].double() + (1 - accept) * res)
    return out


def tv(a, b):
    return 0.5 * (a.double() - b.double()).abs().sum().item()


@pytest.mark.parametrize("residual", ["released", "relaxed"])
@pytest.mark.parametrize("delta", [0.1, 0.2, 0.5])
def test_one_hot_drafts_stay_within_delta(residual, delta):
    g = torch.Generator().manual_seed(1)
    codes = torch.randn(V, 4, generator=g)
    rule = LanternAcceptance(codes, k=8, delta=delta, residual=residual)
    worst = 0.0
    for _ in range(30):
        p = torch.softmax(2 * torch.randn(V, generator=g), -1)
        for x in range(0, V, 3):  # a fixed draft x: q = one-hot
            worst = max(worst, tv(output_distribution(rule, p, torch.nn.functional.one_hot(torch.tensor(x), V)), p))
    assert worst <= delta + 1e-6
    assert worst > 0.5 * delta  # the relaxation does move mass (the bound is not vacuous)


def test_carried_drafts_break_the_bound():
    """SJD's carried draft: q = the previous pass's target, close to but not p; the relaxed test then admits far
    more than delta (why var records LANTERN's drafts one-hot)."""
    g = torch.Generator().manual_seed(2)
    rule = LanternAcceptance(torch.randn(V, 4, generator=g), k=8, delta=0.1)
    worst = 0.0
    for _ in range(30):
        p = torch.softmax(2 * torch.randn(V, generator=g), -1)
        q = torch.softmax(p.log() + 0.5 * torch.randn(V, generator=g), -1)
        worst = max(worst, tv(output_distribution(rule, p, q), p))
    assert worst > 0.1 + 0.05


def test_lantern_in_sjd_records_every_draft_one_hot(monkeypatch):
    gpt = tiny_gpt()
    vq = create("vq_tiny").eval()
    seen = []
    original = LanternAcceptance.ratio_and_residual

    def spy(self, p, q, x):
        seen.append(q)
        return original(self, p, q, x)

    monkeypatch.setattr(LanternAcceptance, "ratio_and_residual", spy)
    out = sample_lantern(gpt.eval(), vq, [1, 2, 3], window=6, k=8, delta=0.2, cfg_scale=2.0, decode=False,
                         generator=torch.Generator().manual_seed(0))
    assert out.stats.extra["iterations"] > 1 and seen
    assert all(bool(((q == 0) | (q == 1)).all()) and bool((q.sum(-1) == 1).all()) for q in seen)
    seen.clear()
    sample_lantern(gpt, vq, [1, 2, 3], window=6, k=8, delta=0.2, cfg_scale=2.0, decode=False, one_hot_drafts=False,
                   generator=torch.Generator().manual_seed(0))
    assert any(not bool(((q == 0) | (q == 1)).all()) for q in seen)  # SJD's carried q: the unbounded variant


def test_released_residual_zeroes_q_on_the_neighbours():
    codes = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
    rule = LanternAcceptance(codes, k=1, delta=0.5)
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    q = torch.tensor([[0.1, 0.5, 0.2, 0.2]])
    x = torch.tensor([1])  # neighbours by distance: 0 or 2 (tie) then the other; k + 1 = 2 are zeroed
    _, residual = rule.ratio_and_residual(p, q, x)
    expected = (p - torch.tensor([[0.0, 0.5, 0.0, 0.2]])).clamp_min(0)
    torch.testing.assert_close(residual, expected)
    assert jacobi.LANTERN_CODES == ("raw", "normalised")
