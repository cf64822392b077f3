"""Compression policies: 100% budget == full cache (same tokens, same seed), budgets, selection rules, profiles."""
import math

import pytest
import torch

from var.errors import ConfigError
from var.kernels import H2O, HACK, CalibrationProfile, CompressedKVCache, ScaleKV, SnapKV, StreamingLLM
from var.kernels.selection import SelectionContext
from var.kernels.policies.base import CacheLayout, grid_window
from var.kernels.policies.scalekv import allocate, classify_drafters
from var.models import create
from var.samplers.calibration import calibrate
from var.samplers.next_scale import sample_next_scale
from var.utils.scales import ScaleSchedule

POLICIES = {"scalekv": ScaleKV, "hack": HACK, "snapkv": SnapKV, "h2o": H2O, "streamingllm": StreamingLLM}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = create("var_tiny", num_heads=2).eval()  # head dim 32
    for p in model.parameters():  # make attention matter: larger random weights than the default init
        p.data.normal_(0, 0.3)
    return model, create("msvq_tiny").eval()


@pytest.fixture(scope="module")
def profile(models):
    return calibrate(*models, [0, 3, 5])


def _sample(models, cache, cfg=1.5, labels=(1, 4, 7)):
    g = torch.Generator().manual_seed(11)
    return sample_next_scale(*models, list(labels), cfg=cfg, top_k=0, top_p=0.0, generator=g, cache=cache,
                             decode=False)


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_full_budget_reproduces_full_cache_tokens(models, profile, name, cfg):
    kwargs = {"profile": profile} if name in ("scalekv", "hack") else {}
    full = _sample(models, None, cfg)
    ours = _sample(models, POLICIES[name](budget=1.0, backend="torch", **kwargs), cfg)
    assert all(torch.equal(a, b) for a, b in zip(full.tokens, ours.tokens))
    assert 0 < ours.stats.peak_kv_cache_bytes


def test_full_budget_on_the_unmodified_tiny_presets():
    torch.manual_seed(0)
    models = (create("var_tiny").eval(), create("msvq_tiny").eval())
    full = _sample(models, None, 1.5)
    for policy in (ScaleKV(budget=1.0, backend="torch"), HACK(budget=1.0, backend="torch"),
                   H2O(budget=1.0, backend="torch")):
        ours = _sample(models, policy, 1.5)
        assert all(torch.equal(a, b) for a, b in zip(full.tokens, ours.tokens))


def test_compression_changes_outputs_and_bounds_the_cache(models, profile):
    """Sanity for the fixture: at 10% the tokens change, and the stored cache is within the budget."""
    model, tok = models
    full = _sample(models, None)
    policy = SnapKV(budget=0.1, backend="torch")
    cache = policy.new_cache(model, 6)
    assert isinstance(cache, CompressedKVCache)
    out = _sample(models, policy)
    assert any(not torch.equal(a, b) for a, b in zip(full.tokens, out.tokens))
    layout = CacheLayout.of(model)
    assert cache.policy.budget_per_head == max(1, round(0.1 * layout.full_carried))


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, 50, float("nan"), True, "0.1", None])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_out_of_range_budget_raises_naming_the_value(name, bad):
    with pytest.raises(ConfigError, match="budget") as err:
        POLICIES[name](budget=bad)
    assert repr(bad) in str(err.value)


def _cache_after(models, policy, scales=3, cache=None):
    """Run the first ``scales`` scales of the sampler's forward passes (random scale inputs, CFG rows) and return
    the cache (scales < 4 are stored)."""
    model, tok = models
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([1, 2])
    cond = model.class_condition(torch.cat((labels, torch.full_like(labels, model.null_class))))
    cache = cache or policy.new_cache(model, 4)
    x = model.first_scale_input(cond)
    with torch.no_grad():
        for si in range(scales):
            model.forward_scale(x, cond, cache)
            if si + 1 < scales:
                pn = model.config.patch_nums[si + 1]
                x = model.scale_input(si + 1, torch.randn(4, pn * pn, model.config.latent_channels, generator=g))
    return cache


def test_streamingllm_keeps_sinks_and_most_recent(models):
    policy = StreamingLLM(budget=0.5, sinks=2, backend="torch")
    cache = _cache_after(models, policy)
    B = cache.policy.budget_per_head  # 7 of 14 (the cache holds the policy bound to the model)
    for layer in range(2):
        assert cache.seg_len[layer].tolist() == [B] * 8
        first = cache.pos_pool[layer][:B].tolist()
        assert first == [0, 1] + list(range(14 - (B - 2), 14))


def test_snapkv_and_h2o_respect_budget_and_window(models):
    for policy in (SnapKV(budget=0.5, window=4, backend="torch"), H2O(budget=0.5, backend="torch")):
        cache = _cache_after(models, policy)
        for layer in range(2):
            assert int(cache.seg_len[layer].max()) <= cache.policy.budget_per_head
        if isinstance(policy, SnapKV):  # the last 4 tokens of scale 2 (positions 10..13) are always kept
            pos = cache.pos_pool[0].view(8, -1)
            assert all({10, 11, 12, 13} <= set(row.tolist()) for row in pos)
        else:
            assert cache.score_pool[0].shape == cache.pos_pool[0].shape
            assert torch.all(cache.score_pool[0] >= 0)


def test_scalekv_profile_classification_and_allocation(models, profile):
    layout = CacheLayout.of(models[0])
    drafters = classify_drafters(profile.asi, 1)
    assert drafters[0] == set() and all(len(d) == 1 for d in drafters[1:])
    for k in range(1, 4):  # the drafter is the layer with the lower ASI z-score at that scale
        lowest = min(range(2), key=lambda l: profile.asi[l][k])
        assert drafters[k] == {lowest}
    caps = allocate(layout, 7, drafters, window=4)
    assert caps[0] == [1, 1] and caps[1] == [5, 5]          # below the budget: nothing to compress
    assert sum(caps[2]) <= 2 * 7 and max(caps[2]) > min(caps[2])
    policy = ScaleKV(budget=0.5, profile=profile, drafters_per_scale=1, window=4, backend="torch")
    cache = _cache_after(models, policy)
    bound = cache.policy
    d = next(iter(bound.drafters[3]))
    assert int(cache.seg_len[d].max()) == bound.caps[2][d] > int(cache.seg_len[1 - d].max())


INFINITY_2B_1M = ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32),
                  (40, 40), (48, 48), (64, 64))


def test_scalekv_paper_refiner_decay_keeps_the_uniform_average_and_reproduces_the_released_2b_budgets():
    """The paper's B_r(j) = B_r(0) - delta * j (B_r(0) = 600, delta = 70 at 650 tokens: its best ablation) on
    Infinity-2B's layout, with the release's two drafters: the drafters take their whole cache, the refiners the
    rest; the released 2B budget file holds refiner budgets 632, 594, 526, 420 at these scales."""
    layout, budget = CacheLayout(32, 16, 128, INFINITY_2B_1M), 650
    drafters = [set()] + [{0, 23}] * 12
    caps = allocate(layout, budget, drafters, window=16, refiner_start=600 / 650, refiner_decay=70 / 650)
    compressed = [si for si in range(13) if layout.schedule.tokens_through(si) > budget]
    for si in compressed:
        assert budget - 1 <= sum(caps[si]) / 32 <= budget  # the uniform budget on average (integer floors)
    refiners = [caps[si][1] for si in compressed[:4]]
    assert [caps[si][0] for si in compressed[:4]] == [layout.schedule.tokens_through(si) for si in compressed[:4]]
    assert refiners == [631, 593, 525, 418]
    assert all(abs(r - released) <= 2 for r, released in zip(refiners, (632, 594, 526, 420)))
    assert caps[compressed[4]][1] == 320 and caps[compressed[4]][0] == 5600  # 600 - 4 * 70: the drafters' turn
    assert allocate(layout, budget, drafters, window=16) != caps  # the default (released-file) allocation differs
    with pytest.raises(ConfigError, match="refiner_decay"):
        ScaleKV(budget=0.1, refiner_decay=0.1)  # a decay needs its start
    with pytest.raises(ConfigError, match="refiner_start"):
        ScaleKV(budget=0.1, refiner_start=1.5)


def test_grid_window_centres_and_fallback():
    def ctx(pn):
        n = pn * pn
        return SelectionContext(layer=0, start=sum(p * p for p in range(1, pn)), n_cur=n, scale=1.0,
                                q_BHnD=torch.zeros(1, 1, n, 4), k_cand_BHPD=torch.zeros(1, 1, n, 4),
                                valid_BHP=torch.ones(1, 1, n, dtype=torch.bool), pos_BHP=torch.zeros(1, 1, n),
                                max_prefix=0, schedule=ScaleSchedule(tuple(range(1, 21))))
    idx = grid_window(ctx(16), 16)
    assert sorted({int(i) // 16 for i in idx}) == [1, 5, 9, 13] and len(idx) == 16
    idx20 = grid_window(ctx(20), 16)
    assert sorted({int(i) % 20 for i in idx20}) == [2, 7, 12, 17]
    assert grid_window(ctx(3), 16).tolist() == list(range(9))  # smaller than the grid: last W (all 9)


def test_hack_asymmetric_budgets_and_structural_rule(models, profile):
    policy = HACK(budget=0.5, profile=profile, contextual_fraction=0.5, contextual_share=0.25, backend="torch")
    policy = policy.bind(CacheLayout.of(models[0]))
    assert policy.contextual.sum() == 2
    var = torch.tensor(profile.head_variance)
    assert torch.equal(policy.contextual, var <= var.flatten().sort().values[1])
    assert policy.budget_contextual < policy.budget_structural
    assert 0.5 * (policy.budget_contextual + policy.budget_structural) <= policy.budget_per_head
    cache = _cache_after(models, policy)
    for layer in range(2):
        lens = cache.lengths(layer)
        caps = policy.caps_LH[layer]
        assert torch.equal(lens, torch.minimum(caps, torch.tensor(14)).expand_as(lens).int())
        for h in range(2):
            if not policy.contextual[layer, h]:  # structural: first two scales and the whole last scale kept
                for b in range(4):
                    bh = b * 2 + h
                    s, n = int(cache.seg_start[layer][bh]), int(cache.seg_len[layer][bh])
                    pos = set(cache.pos_pool[layer][s:s + n].tolist())
                    assert set(range(5)) <= pos and pos - set(range(5)) <= set(range(5, 14))


def test_hack_structural_fills_middle_by_score():
    """Structural head: first two scales, then the current scale, then the best-scoring middle token."""
    policy = HACK(budget=0.5, backend="torch")  # no profile: every head structural, B_S = B
    policy = policy.bind(CacheLayout(depth=1, num_heads=1, head_dim=4, patch_nums=(1, 2, 4, 2)))
    assert policy.budget_structural == policy.budget_per_head == 10
    k = torch.zeros(1, 1, 25, 4)
    k[0, 0, 12] = torch.tensor([5.0, 0, 0, 0])   # a middle token every query attends to
    k[0, 0, 7] = torch.tensor([2.0, 0, 0, 0])
    q = torch.tensor([1.0, 0, 0, 0]).expand(1, 1, 4, 4)
    ctx = SelectionContext(layer=0, start=21, n_cur=4, scale=1.0, q_BHnD=q, k_cand_BHPD=k,
                           valid_BHP=torch.ones(1, 1, 25, dtype=torch.bool),
                           pos_BHP=torch.arange(25).view(1, 1, 25), max_prefix=21, schedule=ScaleSchedule((1, 2, 4, 2)))
    keep = policy.select(ctx).keep_BHP[0, 0]
    assert keep.nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 12, 21, 22, 23, 24]


def test_profile_roundtrip_and_mismatch(tmp_path, models, profile):
    path = profile.save(tmp_path / "var_tiny_kv_profile.json")
    loaded = CalibrationProfile.load(path)
    assert loaded == profile
    assert all(a is None for a in (row[0] for row in loaded.asi))
    assert all(math.isfinite(v) for row in loaded.head_variance for v in row)
    policy = ScaleKV(budget=0.25, profile=str(path), backend="torch")
    _sample(models, policy)
    other = create("var_tiny", num_heads=4)
    with pytest.raises(ConfigError, match="profile"):
        HACK(budget=0.5, profile=path).new_cache(other, 2)
    with pytest.raises(ConfigError, match="cannot read"):
        CalibrationProfile.load(tmp_path / "missing.json")


def test_triton_backend_inside_the_model_matches_torch(models, profile):
    """The dispatched kernel inside a real model pass (TRITON_INTERPRET=1 on the CPU) vs the PyTorch path."""
    pytest.importorskip("triton")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1")
    caches = [_cache_after(models, HACK(budget=0.5, profile=profile, backend=b), scales=3) for b in ("torch", "triton")]
    model = models[0]
    cond = model.class_condition(torch.tensor([1, 2, 10, 10]))
    x = model.scale_input(3, torch.randn(4, 16, model.config.latent_channels))
    with torch.no_grad():
        a, b = (model.forward_scale(x, cond, c) for c in caches)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class _AlwaysSelect:
    """Forwards to a bound policy but skips its cheap pre-check: the cache then asks ``select`` at every scale."""

    def __init__(self, policy):
        self.policy, self.tracks_scores = policy, policy.tracks_scores

    def wants_selection(self, layer, start, n, max_key_len):
        return True

    def select(self, ctx):
        return self.policy.select(ctx)


@pytest.mark.parametrize("name", ["scalekv", "hack", "snapkv", "streamingllm"])
def test_cheap_precheck_agrees_with_select(models, profile, name):
    kwargs = {"profile": profile} if name in ("scalekv", "hack") else {}
    policy = POLICIES[name](budget=0.5, backend="torch", **kwargs)
    fast = _cache_after(models, policy)
    slow = _cache_after(models, None, cache=CompressedKVCache(
        2, 4, 2, 32, capacity=30, policy=_AlwaysSelect(policy.bind(CacheLayout.of(models[0]))),
        schedule=ScaleSchedule((1, 2, 3, 4)), backend="torch"))
    for layer in range(2):
        assert torch.equal(fast.pos_pool[layer], slow.pos_pool[layer])
        assert torch.equal(fast.k_pool[layer], slow.k_pool[layer])


def test_hack_merge_averages_evicted_into_most_similar_kept():
    from var.kernels.policies.hack import merge_evicted

    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [0.8, 0.0]]).view(1, 1, 5, 2)
    v = torch.arange(10.0).view(1, 1, 5, 2)
    keep = torch.tensor([True, True, False, False, False]).view(1, 1, 5)
    evict = torch.tensor([False, False, True, True, False]).view(1, 1, 5)  # candidate 4 is not merged
    k2, v2 = merge_evicted(k, v, keep, evict)
    torch.testing.assert_close(k2[0, 0, 0], (k[0, 0, 0] + k[0, 0, 2]) / 2)
    torch.testing.assert_close(k2[0, 0, 1], (k[0, 0, 1] + k[0, 0, 3]) / 2)
    torch.testing.assert_close(v2[0, 0, 0], (v[0, 0, 0] + v[0, 0, 2]) / 2)
    torch.testing.assert_close(v2[0, 0, 1], (v[0, 0, 1] + v[0, 0, 3]) / 2)


def test_hack_merge_in_the_sampler(models, profile):
    """Merging only touches contextual heads at the last stored compression; 100% stays exact."""
    full = _sample(models, None)
    same = _sample(models, HACK(budget=1.0, profile=profile, merge=True, backend="torch"))
    assert all(torch.equal(a, b) for a, b in zip(full.tokens, same.tokens))
    policy = HACK(budget=0.5, profile=profile, merge=True, backend="torch")
    plain = _cache_after(models, HACK(budget=0.5, profile=profile, backend="torch"))
    merged = _cache_after(models, policy)  # scale 2 is the last stored one for 4 scales
    policy = merged.policy  # bound to the model: holds the head classification
    for layer in range(2):
        assert torch.equal(plain.pos_pool[layer], merged.pos_pool[layer])
        changed = (plain.k_pool[layer] != merged.k_pool[layer]).any(-1)
        head = torch.repeat_interleave(torch.arange(8), plain.seg_len[layer].long()) % 2
        assert not changed[~policy.contextual[layer][head]].any()     # structural heads untouched
        if policy.contextual[layer].any():
            assert changed.any()


def test_cfg_halves_select_their_own_tokens(models, profile):
    """With CFG the cache has 2B rows; conditional and unconditional rows are compressed independently."""
    cache = _cache_after(models, SnapKV(budget=0.25, window=2, backend="torch"))
    pos = cache.pos_pool[0].view(4, 2, -1)        # [rows (2 cond + 2 uncond), heads, kept]
    assert not torch.equal(pos[:2], pos[2:])


@pytest.mark.parametrize("name", ["scalekv", "hack", "snapkv"])
def test_new_cache_leaves_the_policy_unchanged(models, name):
    """One policy object for two models of different sizes (CoDe's drafter and refiner): each cache gets a copy
    bound to its own model; the object itself keeps no per-model state. (No profile: a profile fits one model.)"""
    policy = POLICIES[name](budget=0.5, backend="torch")
    before = dict(vars(policy))
    small = policy.new_cache(models[0], 4)
    wide = create("var_tiny", depth=3)
    big = policy.new_cache(wide, 2)
    assert vars(policy) == before and policy.layout is None
    assert small.policy.layout == CacheLayout.of(models[0]) and big.policy.layout == CacheLayout.of(wide)
    assert small.policy is not big.policy and small.policy.budget_per_head == policy.bind(
        CacheLayout.of(models[0])).budget_per_head
    with pytest.raises(ConfigError, match="not bound"):
        policy.scale_index(0, 1)
