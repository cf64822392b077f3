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

from released_budgets import RELEASED_2B_10, RELEASED_8B_10, released_file
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


# ---- budgets ------------------------------------------------------------------------------------------------
INFINITY_1024 = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
def write_released(tmp_path, name, depth, table):
    import json
    path = tmp_path / name
    path.write_text(json.dumps(released_file(depth, table)))
    return path


@pytest.mark.parametrize("name, depth, table", [("2b_10%_budget.json", 32, RELEASED_2B_10),
                                                ("8b_10%_budget.json", 40, RELEASED_8B_10)])
def test_released_budget_files_give_their_caps_and_drafters_at_every_named_scale(tmp_path, name, depth, table,
                                                                                caplog):
    """Each ``Scale k`` entry caps the cache carried into the k-th scale (1-based; the release's
    ``cache_sizes[scale_ind + 2]``): drafters (flag 1) keep ``Max``, refiners ``Min``, the per-layer average is
    650 tokens at every compressed scale (``base_capacity=650`` in the release's ``infer_{2b,8b}.py``; the uniform
    10% of 6425 would be 642); scales the file does not name (key length <= 650) are not compressed. ``Limit`` is
    what a drafter holds when the rule runs (previous Max + the scale's tokens): the 1024 px schedule matches it, so
    nothing is reported."""
    layout = CacheLayout(depth=depth, num_heads=2, head_dim=4, patch_nums=INFINITY_1024)
    with caplog.at_level("WARNING"):
        policy = ScaleKV(0.1, released_budgets=write_released(tmp_path, name, depth, table), backend="torch")
        policy = policy.bind(layout)
    assert "another schedule" not in caplog.text
    assert layout.budget_tokens(0.1) == 642
    for k, (drafter_cap, refiner_cap, limit, high, drafters) in table.items():
        si = k - 2
        assert policy.caps[si] == [drafter_cap if b in drafters else refiner_cap for b in range(depth)], k
        assert sum(policy.caps[si]) == 650 * depth, k
        assert policy.drafters[si + 1] == drafters and len(drafters) == high, k  # role at the scale it feeds
        held = (policy.caps[si - 1][min(drafters)] if si - 1 >= 0 else 0) + layout.schedule.lengths[si]
        assert held == limit and drafter_cap <= limit < layout.schedule.tokens_through(si) + 1, k
    for si in range(7):  # key length 521 or less after these scales: not compressed, no drafters
        assert policy.caps[si] == [layout.schedule.tokens_through(si)] * depth and not policy.drafters[si + 1]
    assert layout.schedule.tokens_through(6) <= 650 < layout.schedule.tokens_through(7)
    assert policy.caps[12] == [layout.schedule.tokens_through(12)] * depth  # after the last scale: nothing to carry
    assert policy.floor == min(r[1] for r in table.values())


def test_the_2b_file_has_two_drafters_then_one_and_the_8b_file_three():
    """What the docs and ``default_drafters_per_scale`` claim about the real files."""
    from var.kernels.policies.scalekv import ReleasedBudgets, default_drafters_per_scale
    b2 = ReleasedBudgets.parse(released_file(32, RELEASED_2B_10))
    b8 = ReleasedBudgets.parse(released_file(40, RELEASED_8B_10))
    assert [len(b2.entries[k - 2][0]) for k in range(9, 14)] == [2, 2, 2, 2, 1]
    assert [len(b8.entries[k - 2][0]) for k in range(9, 14)] == [3] * 5
    assert default_drafters_per_scale(32) == 2 and default_drafters_per_scale(40) == 3
    assert default_drafters_per_scale(16) == 1 and default_drafters_per_scale(30) == 2
    assert b2.limits == {k - 2: v[2] for k, v in RELEASED_2B_10.items()}


def test_released_budget_file_errors(tmp_path, caplog):
    from var.errors import ConfigError
    from var.kernels.policies.scalekv import ReleasedBudgets
    good = released_file(32, RELEASED_2B_10)
    path = write_released(tmp_path, "2b.json", 32, RELEASED_2B_10)
    with pytest.raises(ConfigError, match="32 layers"):
        ScaleKV(0.1, released_budgets=path).bind(CacheLayout(depth=40, num_heads=2, head_dim=4,
                                                             patch_nums=INFINITY_1024))
    with pytest.raises(ConfigError, match="Scale 13.*10 scales"):  # a 10-scale schedule has no scale 13
        ScaleKV(0.1, released_budgets=path).bind(CacheLayout(32, 2, 4, INFINITY_1024[:10]))
    with pytest.raises(ConfigError, match="Scale"):
        ReleasedBudgets.parse({"layers": {}})
    with pytest.raises(ConfigError, match="High=3"):
        ReleasedBudgets.parse({**good, "Scale 9": {**good["Scale 9"], "High": 3}})
    with pytest.raises(ConfigError, match="exceeds Limit"):
        ReleasedBudgets.parse({**good, "Scale 9": {**good["Scale 9"], "Max": 1000}})
    with pytest.raises(ConfigError, match="flags"):
        ReleasedBudgets.parse({**good, "Scale 9": {**good["Scale 9"], "Block 3": 2}})
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        ReleasedBudgets.load(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="cannot read"):
        ReleasedBudgets.load(tmp_path / "missing.json")
    # another schedule (a 1:2 one of 13 scales): the caps are used as they are, and the mismatch is logged
    other = CacheLayout(32, 2, 4, tuple((p, 2 * p) for p in INFINITY_1024[:12]) + ((64, 128),))
    with caplog.at_level("WARNING"):
        ScaleKV(0.1, released_budgets=path).bind(other)
    assert "another schedule" in caplog.text and "Limit 921" in caplog.text


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
