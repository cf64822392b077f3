"""SnapKV and ScaleKV keep the same token sets as their releases on fixed scores.

The releases' selection rules are written out here with plain torch ops (not through the policies):
* SnapKV (FasterDecoding/SnapKV ``SnapKVCluster.update_kv``): pool the summed window scores of the non-window part
  only (``F.avg_pool1d``, zero padding counted), keep its top ``cap - W`` plus the window;
* ScaleKV (StargazerX0/ScaleKV ``ScaleKVCluster.update_kv``): window columns set to -inf before the sum and the
  max-pool, pooled window entries -inf, keep the top ``cap - W`` plus the window.
Before the fix the window's own (large) scores leaked into its neighbours through the pooling.
"""
import pytest
import torch
import torch.nn.functional as F

from var.kernels import ScaleKV, SnapKV
from var.kernels.selection import SelectionContext
from var.kernels.policies.base import CacheLayout, grid_window, pool1d
from var.utils.scales import ScaleSchedule

PATCH_NUMS = (1, 2, 3, 4, 6)
PREFIX, CUR = 30, 36
P = PREFIX + CUR
LAYOUT = CacheLayout(depth=1, num_heads=1, head_dim=4, patch_nums=PATCH_NUMS)


def context(scores_P):
    ctx = SelectionContext(layer=0, start=PREFIX, n_cur=CUR, scale=1.0, q_BHnD=torch.zeros(1, 1, CUR, 4),
                           k_cand_BHPD=torch.zeros(1, 1, P, 4), valid_BHP=torch.ones(1, 1, P, dtype=torch.bool),
                           pos_BHP=torch.arange(P).view(1, 1, P), max_prefix=PREFIX, schedule=ScaleSchedule(PATCH_NUMS))
    ctx.observation_scores = lambda idx, softmax=True: scores_P.view(1, 1, P).clone()  # fixed scores
    return ctx


def fixed_scores(seed, window_P):
    """Random scores with large window (self-attention) entries, chosen so that the release's top-k has no tie at
    its cut-off (torch.topk's tie order is unspecified)."""
    scores = torch.rand(P, generator=torch.Generator().manual_seed(seed))
    scores[window_P] += 5.0
    return scores


def kept(policy, scores):
    return set(policy.select(context(scores)).keep_BHP[0, 0].nonzero().flatten().tolist())


def untied_topk(pooled, k):
    values, idx = pooled.topk(k + 1)
    return set(idx[:k].tolist()) if values[k - 1] > values[k] else None


def released_snapkv(scores, window, cap, kernel=5):
    rest = scores[:P - window]
    pooled = F.avg_pool1d(rest.view(1, 1, -1), kernel, stride=1, padding=kernel // 2).view(-1)
    top = untied_topk(pooled, cap - window)
    return None if top is None else top | set(range(P - window, P))


def released_scalekv(scores, window_P, cap, kernel=5):
    masked = scores.clone()
    masked[window_P] = float("-inf")
    pooled = F.max_pool1d(masked.view(1, 1, -1), kernel, stride=1, padding=kernel // 2).view(-1)
    pooled[window_P] = float("-inf")
    top = untied_topk(pooled, cap - len(window_P))
    return None if top is None else top | set(window_P.tolist())


def test_snapkv_pools_only_the_non_window_part_as_released():
    policy = SnapKV(0.5, window=4, backend="torch")
    policy = policy.bind(LAYOUT)
    cap = policy.budget_per_head  # 15 of 30
    window = torch.arange(P - 4, P)
    compared = differs = 0
    for seed in range(20):
        scores = fixed_scores(seed, window)
        expected = released_snapkv(scores, 4, cap)
        if expected is None:
            continue
        compared += 1
        assert kept(policy, scores) == expected, seed
        old = pool1d(scores.view(1, 1, P), torch.ones(1, 1, P, dtype=torch.bool), 5, "avg")[0, 0]
        old[window] = float("inf")
        differs += set(old.topk(cap).indices.tolist()) != expected  # the old rule kept the window's neighbours
    assert compared >= 10 and differs == compared


def test_scalekv_masks_the_window_before_pooling_as_released():
    policy = ScaleKV(0.5, window=4, backend="torch")  # no profile: uniform caps (what this rule is about)
    policy = policy.bind(LAYOUT)
    cap = policy.budget_per_head
    window = PREFIX + grid_window(context(torch.zeros(P)), 4)
    compared = differs = 0
    for seed in range(300):
        scores = fixed_scores(seed, window)
        expected = released_scalekv(scores, window, cap)
        if expected is None:
            continue
        compared += 1
        assert kept(policy, scores) == expected, seed
        old = pool1d(scores.view(1, 1, P), torch.ones(1, 1, P, dtype=torch.bool), 5, "max")[0, 0]
        old[window] = float("inf")
        differs += set(old.topk(cap).indices.tolist()) != expected
    assert compared >= 10 and differs == compared  # the old rule kept the window's neighbours every time


@pytest.mark.parametrize("scores", ["softmax", "logits"])
def test_scalekv_score_modes(scores):
    policy = ScaleKV(0.5, window=4, scores=scores, backend="torch")
    assert repr(policy).endswith(f"scores={scores!r})")
    with pytest.raises(Exception, match="scores"):
        ScaleKV(0.5, scores="raw")


# ---- budgets -------------------------------------------------------------------------------------------------
INFINITY_1024 = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)


def released_file(depth, drafters, entries):
    """A budget file in the release's format; ``entries``: {scale k: (Max, Min)} (numbers of the 2B file)."""
    return {f"Scale {k}": {**{f"Block {b}": int(b in drafters) for b in range(depth)}, "High": len(drafters),
                           "Max": mx, "Min": mn, "Limit": 0} for k, (mx, mn) in entries.items()}


def test_released_budget_file_gives_650_tokens_at_10_percent(tmp_path):
    """Infinity-2B's ``budgets/2b_10%_budget.json``: at the last compression block 0 keeps 6385 tokens and the 31
    others 465: 650 on average (``round(0.1 * 6425)`` = 642 is what the uniform definition gives)."""
    import json

    from var.kernels.policies.scalekv import ReleasedBudgets
    path = tmp_path / "2b_10%_budget.json"
    path.write_text(json.dumps(released_file(32, {0}, {12: (4100, 420), 13: (6385, 465)})))
    layout = CacheLayout(depth=32, num_heads=2, head_dim=4, patch_nums=INFINITY_1024)
    policy = ScaleKV(0.1, released_budgets=path, backend="torch")
    policy = policy.bind(layout)
    assert sum(policy.caps[11]) / 32 == 650 and layout.budget_tokens(0.1) == 642
    assert policy.caps[11][0] == 6385 and policy.caps[10][0] == 4100 and policy.caps[10][1] == 420
    assert policy.caps[9] == [layout.schedule.tokens_through(9)] * 32  # no entry: not compressed
    assert policy.drafters[12] == {0} and policy.drafters[11] == {0}
    with pytest.raises(Exception, match="32 layers"):
        policy.bind(CacheLayout(depth=40, num_heads=2, head_dim=4, patch_nums=INFINITY_1024))
    with pytest.raises(Exception, match="Scale"):
        ReleasedBudgets.parse({"layers": {}})


INFINITY_8B_10 = {9: (909, 629), 10: (1464, 584), 11: (2463, 503), 12: (4054, 374), 13: (6200, 200)}


def test_released_8b_budget_file_gives_650_tokens_per_layer_at_every_compressed_scale(tmp_path):
    """Infinity-8B's ``budgets/8b_10%_budget.json`` (40 blocks, drafters 0, 1, 2 at every compressed scale): the
    per-layer average is 650 at each scale it names, drafters keep nearly the whole cache, refiners 200-629."""
    import json

    path = tmp_path / "8b_10%_budget.json"
    path.write_text(json.dumps(released_file(40, {0, 1, 2}, INFINITY_8B_10)))
    layout = CacheLayout(depth=40, num_heads=2, head_dim=4, patch_nums=INFINITY_1024)
    policy = ScaleKV(0.1, released_budgets=path, backend="torch").bind(layout)
    for k, (drafter_cap, refiner_cap) in INFINITY_8B_10.items():
        caps = policy.caps[k - 2]
        assert caps[:3] == [min(drafter_cap, layout.schedule.tokens_through(k - 2))] * 3 and caps[3:] == [refiner_cap] * 37
        assert sum(caps) / 40 == 650
        assert policy.drafters[k - 1] == {0, 1, 2}
    assert policy.caps[6] == [layout.schedule.tokens_through(6)] * 40  # scales the file does not name: not compressed
    assert policy.caps[12] == [layout.schedule.tokens_through(12)] * 40  # after the last scale: nothing to carry


def test_default_drafter_count_follows_the_released_budgets():
    from var.kernels.policies.scalekv import default_drafters_per_scale
    assert default_drafters_per_scale(40) == 3 and default_drafters_per_scale(32) == 2  # 8B and 2B files
    assert default_drafters_per_scale(16) == 1 and default_drafters_per_scale(30) == 2


# ---- PyramidKV -----------------------------------------------------------------------------------------------
def test_pyramidkv_layer_budgets_and_selection_follow_the_release():
    """PyramidKVCluster (Zefan-Cai/PyramidKV, pyramidkv_utils.py): C = 15, w = 4, beta = 20 over 4 layers and 66
    keys: min = 11 // 20 = 0, max = 22 (capped at 66 - 4 = 62: no), step = 22 // 3 = 7 -> 26, 19, 12, 5 tokens plus
    the window; each layer then selects as SnapKV with its own cap."""
    from var.kernels.policies import PyramidKV
    policy = PyramidKV(0.5, window=4, backend="torch")
    policy = policy.bind(CacheLayout(depth=4, num_heads=1, head_dim=4, patch_nums=PATCH_NUMS))
    assert policy.budget_per_head == 15
    assert [policy.layer_cap(layer, P) for layer in range(4)] == [26, 19, 12, 5]
    assert policy.layer_cap(0, 20) == 15  # fewer than 2 (C - w) keys: plain SnapKV
    window = torch.arange(P - 4, P)
    compared = 0
    for seed in range(20):
        scores = fixed_scores(seed, window)
        for layer in range(4):
            cap = policy.layer_cap(layer, P)
            expected = released_snapkv(scores, 4, cap)
            if expected is None:
                continue
            ctx = context(scores)
            ctx.layer = layer
            assert set(policy.select(ctx).keep_BHP[0, 0].nonzero().flatten().tolist()) == expected
            compared += 1
    assert compared >= 20


def test_pyramidkv_runs_in_the_sampler():
    from var.kernels.policies import PyramidKV
    from var.models import create
    from var.samplers.next_scale import sample_next_scale
    torch.manual_seed(0)
    model, tok = create("var_tiny", num_heads=2).eval(), create("msvq_tiny").eval()
    policy = PyramidKV(0.5, window=4, backend="torch")
    out = sample_next_scale(model, tok, [1, 2], cfg=1.5, top_k=0, top_p=0.0, cache=policy, decode=False,
                            generator=torch.Generator().manual_seed(0))
    full = sample_next_scale(model, tok, [1, 2], cfg=1.5, top_k=0, top_p=0.0, decode=False,
                             generator=torch.Generator().manual_seed(0))
    assert len(out.tokens) == len(full.tokens) and out.stats.peak_kv_cache_bytes < full.stats.peak_kv_cache_bytes
