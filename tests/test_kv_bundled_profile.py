"""Budgets at or below the observation window (small models), and the calibration profile shipped with the
bundled VAR: ScaleKV with it must keep different tokens than SnapKV."""
import pytest
import torch

from var.assets import bundled_var_dir
from var.kernels import CalibrationProfile, ScaleKV, SnapKV, bundled_profile
from var.kernels.selection import SelectionContext
from var.kernels.policies.base import CacheLayout
from var.kernels.policies.calibration import bundled_profile_path
from var.kernels.policies.scalekv import allocate
from var.samplers.next_scale import sample_next_scale
from var.utils.scales import ScaleSchedule

PATCH_NUMS = (1, 2, 4, 2)  # 21 tokens carried into the last scale


def _ctx():
    """Last scale (4 queries at 21..24); every query attends to key 12 most, then key 7; the rest are zeros."""
    k = torch.zeros(1, 1, 25, 4)
    k[0, 0, 12] = torch.tensor([5.0, 0, 0, 0])
    k[0, 0, 7] = torch.tensor([2.0, 0, 0, 0])
    q = torch.tensor([1.0, 0, 0, 0]).expand(1, 1, 4, 4)
    return SelectionContext(layer=0, start=21, n_cur=4, scale=1.0, q_BHnD=q, k_cand_BHPD=k,
                            valid_BHP=torch.ones(1, 1, 25, dtype=torch.bool),
                            pos_BHP=torch.arange(25).view(1, 1, 25), max_prefix=21, schedule=ScaleSchedule(PATCH_NUMS))


@pytest.mark.parametrize("policy_cls", [SnapKV, ScaleKV])
def test_cap_not_above_window_keeps_top_scores_not_window_positions(policy_cls):
    policy = policy_cls(budget=0.1, window=4, kernel=1, backend="torch")  # cap 2 <= window 4
    policy = policy.bind(CacheLayout(depth=1, num_heads=1, head_dim=4, patch_nums=PATCH_NUMS))
    assert policy.budget_per_head == 2
    keep = policy.select(_ctx()).keep_BHP[0, 0]
    # reference: the two largest softmax scores of the window's queries (keys 12 and 7), no forced window
    assert keep.nonzero().flatten().tolist() == [7, 12]


@pytest.mark.parametrize("policy_cls", [SnapKV, ScaleKV])
def test_cap_above_window_still_forces_the_window(policy_cls):
    policy = policy_cls(budget=0.3, window=4, kernel=1, backend="torch")  # cap 6 > window 4
    policy = policy.bind(CacheLayout(depth=1, num_heads=1, head_dim=4, patch_nums=PATCH_NUMS))
    assert policy.budget_per_head == 6
    keep = policy.select(_ctx()).keep_BHP[0, 0]
    assert keep.nonzero().flatten().tolist() == [7, 12, 21, 22, 23, 24]


def test_drafters_get_more_than_refiners_when_budget_is_below_window():
    layout = CacheLayout(depth=4, num_heads=4, head_dim=24, patch_nums=(1, 2, 3, 4, 6, 8))  # the bundled VAR
    drafters = [set(), {1}, {0}, {0}, {1}, {0}]
    for budget in (7, 16):  # 10% and 25% of the 66 carried tokens, both <= window 16
        caps = allocate(layout, budget, drafters, window=16)
        last = caps[4]  # the cache carried into the last scale: layer 0 is its drafter
        assert last[0] > budget > last[1] == last[2] == last[3] >= max(1, budget // 2)
        assert sum(last) <= 4 * budget
        for si in range(5):
            assert sum(caps[si]) <= 4 * max(budget, 1) or layout.schedule.tokens_through(si) <= budget
            assert all(c <= layout.schedule.tokens_through(si) for c in caps[si])


needs_bundled = pytest.mark.skipif(bundled_var_dir() is None or not bundled_profile_path().exists(),
                                   reason="bundled VAR or its KV profile not installed")


class _Recorder:
    def __init__(self, policy):
        self.policy, self.cache = policy, None

    def new_cache(self, model, batch_size, **kw):
        self.cache = self.policy.new_cache(model, batch_size, **kw)
        return self.cache


@needs_bundled
def test_bundled_profile_matches_the_bundled_model_and_scalekv_differs_from_snapkv():
    from var.hub import load_var

    d = bundled_var_dir()
    tok, model = load_var(d / "tokenizer", d / "transformer")
    profile = bundled_profile()
    assert isinstance(profile, CalibrationProfile)
    profile.check(CacheLayout.of(model))
    kept = {}
    for name, policy in (("scalekv", ScaleKV(budget=0.1, profile=profile, backend="torch")),
                         ("snapkv", SnapKV(budget=0.1, backend="torch"))):
        rec = _Recorder(policy)
        with torch.no_grad():
            sample_next_scale(model.eval(), tok.eval(), [1, 6], cfg=1.5, top_k=0, top_p=0.0, decode=False,
                              generator=torch.Generator().manual_seed(0), cache=rec)
        kept[name] = [(rec.cache.seg_len[l].tolist(), rec.cache.pos_pool[l].tolist()) for l in range(4)]
    scalekv = ScaleKV(budget=0.1, profile=profile)
    scalekv = scalekv.bind(CacheLayout.of(model))
    carried = scalekv.caps[len(scalekv.layout.patch_nums) - 2]
    assert len(set(carried)) > 1  # drafter and refiner budgets into the last scale
    assert [lens for lens, _ in kept["scalekv"]] == [[c] * 16 for c in carried]  # 2 images x CFG x 4 heads
    assert all(lens == [7] * 16 for lens, _ in kept["snapkv"])
    assert kept["scalekv"] != kept["snapkv"]
