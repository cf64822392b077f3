"""sample_infinity: shapes/stats, exact bit distribution, greedy == teacher-forced argmax, CFG modes, generators,
bad input; every KV-cache policy runs on Infinity and a 100% budget gives the full cache's bits."""
import json

import pytest
import torch

from infinity_helpers import TINY_SCHEDULE, random_text, tiny_infinity, tiny_vae
from released_budgets import RELEASED_2B_10, released_file
from var.errors import AspectRatioError, ConfigError
from var.kernels import HACK, ScaleKV
from var.samplers.infinity import calibrate_infinity, sample_infinity
from var.samplers.registry import cache_policies
from var.utils.scales import ScaleSchedule


@pytest.fixture(scope="module")
def pair():
    return tiny_vae(), tiny_infinity()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_shapes_and_stats(pair):
    vae, model = pair
    out = sample_infinity(model, vae, random_text(3), schedule=TINY_SCHEDULE, cfg_list=2.0, tau_list=0.7,
                          generator=_gen())
    assert out.images.shape == (3, 3, 16, 16) and 0 <= out.images.min() and out.images.max() <= 1
    assert [tuple(b.shape) for b in out.tokens] == [(3, h, w, 6) for h, w in TINY_SCHEDULE.grids]
    s = out.stats
    assert s.forward_passes == 4 and s.tokens == TINY_SCHEDULE.seq_len and s.wall_time_s > 0
    full_bytes = 2 * 2 * 6 * 4 * TINY_SCHEDULE.seq_len * 16 * 4  # layers * (K,V) * rows * heads * L * D * fp32
    assert s.peak_kv_cache_bytes == full_bytes and s.peak_kv_live_bytes == full_bytes
    unguided = sample_infinity(model, vae, random_text(3), schedule=TINY_SCHEDULE, cfg_list=1.0, generator=_gen())
    assert unguided.stats.peak_kv_cache_bytes == full_bytes // 2  # no unconditional rows


def test_per_sample_generators_equal_single_runs(pair):
    vae, model = pair
    feats, mask = random_text(2)
    both = sample_infinity(model, vae, (feats, mask), schedule=TINY_SCHEDULE, cfg_list=[1.5, 2, 3, 4], tau_list=0.9,
                           top_p=0.9, generator=[_gen(1), _gen(2)])
    for b, seed in enumerate((1, 2)):
        n = int(mask[b].sum())
        one = sample_infinity(model, vae, (feats[b:b + 1, :n], mask[b:b + 1, :n]), schedule=TINY_SCHEDULE,
                              cfg_list=[1.5, 2, 3, 4], tau_list=0.9, top_p=0.9, generator=[_gen(seed)])
        assert all(torch.equal(x[b:b + 1], y) for x, y in zip(both.tokens, one.tokens))


@pytest.mark.parametrize("gumbel", [False, True])
def test_bits_follow_the_model_distribution(pair, gumbel):
    """One-scale schedule, 2000 samples of one prompt: each bit's frequency vs sigmoid(l1 - l0) within 5 sigma."""
    vae, model = pair
    feats, mask = random_text(1)
    n = 2000
    schedule = ScaleSchedule(((1, 1),), rope_grid=(4, 4))
    out = sample_infinity(model, vae, (feats.expand(n, -1, -1), mask.expand(n, -1)), schedule=schedule, cfg_list=1.0,
                          tau_list=1.3, gumbel=gumbel, generator=_gen(), decode=False)
    text = model.encode_text(feats, mask)
    with torch.no_grad():
        h = model.forward_scale(model.first_scale_input(text), text, 0, schedule, model.new_kv_cache(1, schedule))
        p1 = (model.logits(h, text.cond_BD) / 1.3).view(6, 2).softmax(-1)[:, 1]
    freq = out.tokens[0].float().view(n, 6).mean(0)
    sigma = (p1 * (1 - p1) / n).sqrt()
    assert torch.all((freq - p1).abs() <= 5 * sigma + 1e-3), (freq, p1)


def test_greedy_bits_are_the_teacher_forced_argmax(pair):
    vae, model = pair
    text = random_text(2)
    out = sample_infinity(model, vae, text, schedule=TINY_SCHEDULE, cfg_list=1.0, top_k=1, generator=_gen())
    with torch.no_grad():
        logits = model(model.encode_text(*text), vae.teacher_forcing_input(out.tokens, TINY_SCHEDULE), TINY_SCHEDULE)
    greedy = logits.view(2, -1, 6, 2).argmax(-1)
    sampled = torch.cat([b.reshape(2, -1, 6) for b in out.tokens], 1)
    assert torch.equal(greedy, sampled)
    gumbel = sample_infinity(model, vae, text, schedule=TINY_SCHEDULE, cfg_list=1.0, top_k=1, gumbel=True,
                             generator=_gen(5))
    assert all(torch.equal(a, b) for a, b in zip(gumbel.tokens, out.tokens))


@pytest.mark.parametrize("layer", [0, -1])
def test_guidance_with_identical_negative_is_no_guidance(pair, layer):
    vae, model = pair
    text = random_text(2)
    plain = sample_infinity(model, vae, text, schedule=TINY_SCHEDULE, cfg_list=1.0, generator=_gen(3))
    same = sample_infinity(model, vae, text, schedule=TINY_SCHEDULE, cfg_list=4.0, negative=text,
                           cfg_insertion_layer=layer, generator=_gen(3))
    assert all(torch.equal(a, b) for a, b in zip(plain.tokens, same.tokens))
    other = sample_infinity(model, vae, text, schedule=TINY_SCHEDULE, cfg_list=4.0, cfg_insertion_layer=layer,
                            generator=_gen(3))
    assert not all(torch.equal(a, b) for a, b in zip(plain.tokens, other.tokens))


def test_bad_input(pair):
    vae, model = pair
    text = random_text(2)
    kw = dict(schedule=TINY_SCHEDULE, generator=_gen())
    with pytest.raises(ConfigError, match="cfg_list has 2 values"):
        sample_infinity(model, vae, text, cfg_list=[1, 2], **kw)
    with pytest.raises(ConfigError, match="tau_list has 5 values for 4 scales"):  # not cut silently
        sample_infinity(model, vae, text, tau_list=[1, 1, 1, 1, 1], **kw)
    with pytest.raises(ConfigError, match="tau_list"):
        sample_infinity(model, vae, text, tau_list=0.0, **kw)
    with pytest.raises(ConfigError, match="cfg_insertion_layer"):
        sample_infinity(model, vae, text, cfg_insertion_layer=1, **kw)
    with pytest.raises(ConfigError, match="negative"):
        sample_infinity(model, vae, text, negative=random_text(3), **kw)
    with pytest.raises(ConfigError, match="bits per token"):
        sample_infinity(model, tiny_vae(codebook_dim=8), text, **kw)
    with pytest.raises(ConfigError, match="PromptEmbeddings"):
        sample_infinity(model, vae, ["a red fox"], **kw)
    with pytest.raises(AspectRatioError):
        sample_infinity(model, vae, text, h_div_w=9.0)
    with pytest.raises(ConfigError, match="generators"):
        sample_infinity(model, vae, text, schedule=TINY_SCHEDULE, generator=[_gen()])


def test_every_cache_policy_runs_and_full_budget_is_exact(pair):
    vae, model = pair
    text = random_text(2)
    profile = calibrate_infinity(model, vae, text, schedule=TINY_SCHEDULE, cfg_list=2.0)
    assert len(profile.asi) == 2 and profile.asi[0][0] is None and profile.asi[1][3] is not None
    assert profile.model["patch_nums"] == [1, 2, [2, 3], 4]
    full = sample_infinity(model, vae, text, schedule=TINY_SCHEDULE, cfg_list=2.0, generator=_gen(7))
    for policy in (ScaleKV(1.0, profile=profile), HACK(1.0, profile=profile)):
        out = sample_infinity(model, vae, text, schedule=TINY_SCHEDULE, cfg_list=2.0, generator=_gen(7), cache=policy)
        assert all(torch.equal(a, b) for a, b in zip(out.tokens, full.tokens)), policy
    policies = {name: cls for name, cls in cache_policies().items() if name != "FullCache"}
    assert {"ScaleKV", "HACK", "SnapKV", "PyramidKV", "H2O", "StreamingLLM"} <= set(policies)  # every one of them
    for name, cls in policies.items():
        policy = cls(0.3, profile=profile) if name in ("ScaleKV", "HACK") else cls(0.3)
        out = sample_infinity(model, vae, text, schedule=TINY_SCHEDULE, cfg_list=2.0, generator=_gen(7), cache=policy)
        assert out.images.shape == full.images.shape
        assert out.stats.peak_kv_live_bytes < full.stats.peak_kv_live_bytes, policy


def test_released_scalekv_budgets_on_the_infinity_layout(tmp_path, caplog):
    """The released 2b_10%_budget.json (tests/released_budgets.py) on Infinity-2B's 1M schedule, whose layout
    comes from InfinityAtSchedule (as sample_infinity builds it)."""
    from var.kernels.policies.base import CacheLayout
    from var.models.infinity import Infinity, InfinityAtSchedule
    from var.tokenizers.scale_schedules import dynamic_schedule

    (tmp_path / "2b.json").write_text(json.dumps(released_file(32, RELEASED_2B_10)))
    with torch.device("meta"):
        model = Infinity()
    layout = CacheLayout.of(InfinityAtSchedule(model, dynamic_schedule(1.0, "1M")))
    assert (layout.depth, layout.num_heads, layout.head_dim, layout.seq_len) == (32, 16, 128, 10521)
    policy = ScaleKV(0.1, released_budgets=tmp_path / "2b.json")
    with caplog.at_level("WARNING"):
        policy = policy.bind(layout)
    assert "another schedule" not in caplog.text  # the file's Limits match this schedule
    assert policy.caps[7][0] == policy.caps[7][23] == 920 and policy.caps[7][5] == 632
    assert policy.caps[8][23] == 1490 and policy.caps[3] == [57] * 32
    assert all(sum(policy.caps[si]) == 650 * 32 for si in range(7, 12))
    assert policy.drafters[12] == {0} and policy.drafters[11] == {0, 23}
