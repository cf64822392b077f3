"""Next-scale sampler: determinism, batch == singles, guidance semantics, filtering, named errors."""
import pytest
import torch

from helpers import tiny_var_pair
from var.errors import ClassIdError, ConfigError, NonFiniteLogitsError
from var.samplers import sample_next_scale
from var.samplers.logits import apply_cfg, top_k_top_p_filter


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_output_contract_and_stats():
    tok, model = tiny_var_pair()
    out = sample_next_scale(model, tok, [1, 2, 3], cfg=1.5, top_k=20, top_p=0.9, generator=gen(0))
    assert out.images.shape == (3, 3, 16, 16) and 0 <= out.images.min() and out.images.max() <= 1
    assert [t.shape for t in out.tokens] == [(3, pn, pn) for pn in tok.patch_nums]
    assert out.stats.forward_passes == 4 and out.stats.tokens == 30
    cfg = model.config
    assert out.stats.peak_kv_cache_bytes == 2 * cfg.depth * 6 * cfg.num_heads * 30 * (cfg.width // cfg.num_heads) * 4


@pytest.mark.parametrize("more_smooth", [False, True])
def test_same_seed_same_images(more_smooth):
    tok, model = tiny_var_pair()
    a = sample_next_scale(model, tok, [1, 2], generator=gen(7), more_smooth=more_smooth)
    b = sample_next_scale(model, tok, [1, 2], generator=gen(7), more_smooth=more_smooth)
    c = sample_next_scale(model, tok, [1, 2], generator=gen(8), more_smooth=more_smooth)
    assert torch.equal(a.images, b.images) and all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    assert not all(torch.equal(x, y) for x, y in zip(a.tokens, c.tokens))


def test_batch_with_per_sample_generators_equals_single_runs():
    tok, model = tiny_var_pair()
    labels, seeds = [3, 5, 5, 9], [11, 12, 13, 14]
    batch = sample_next_scale(model, tok, labels, top_k=0, top_p=0.0, generator=[gen(s) for s in seeds])
    for b, (label, seed) in enumerate(zip(labels, seeds)):
        single = sample_next_scale(model, tok, [label], top_k=0, top_p=0.0, generator=[gen(seed)])
        assert all(torch.equal(t[b], s[0]) for t, s in zip(batch.tokens, single.tokens))
        torch.testing.assert_close(batch.images[b], single.images[0], rtol=1e-5, atol=1e-5)


def _teacher_forced_cond_uncond(model, tok, labels, tokens):
    with torch.no_grad():
        cond = model.teacher_forcing_logits(tok, labels, tokens)
        uncond = model.teacher_forcing_logits(tok, torch.full_like(labels, model.null_class), tokens)
    return cond, uncond


@pytest.mark.parametrize("cfg", [0.0, 1.0, 3.0])
def test_greedy_tokens_follow_the_ramped_guidance(cfg):
    """top_k=1 makes sampling greedy: each scale's tokens must be the argmax of VAR's ramped CFG logits
    ((1 + t) * cond - t * uncond, t = cfg * si / (SN - 1)) computed independently by teacher forcing."""
    tok, model = tiny_var_pair()
    labels = torch.tensor([2, 7, 7])
    out = sample_next_scale(model, tok, labels, cfg=cfg, top_k=1, top_p=0.0, generator=gen(0))
    cond, uncond = _teacher_forced_cond_uncond(model, tok, labels, out.tokens)
    for si, (begin, end) in enumerate(model.begin_ends):
        t = cfg * si / (len(tok.patch_nums) - 1)
        guided = apply_cfg(cond[:, begin:end], uncond[:, begin:end], 1 + t)
        assert torch.equal(guided.argmax(-1), out.tokens[si].flatten(1)), f"scale {si}"


def test_cfg_zero_is_conditional_only_and_skips_the_unconditional_half():
    tok, model = tiny_var_pair()
    guided = sample_next_scale(model, tok, [1, 2], cfg=1.0, generator=gen(0))
    plain = sample_next_scale(model, tok, [1, 2], cfg=0.0, generator=gen(0))
    assert plain.stats.peak_kv_cache_bytes * 2 == guided.stats.peak_kv_cache_bytes


def test_sampled_tokens_respect_top_k_and_top_p():
    tok, model = tiny_var_pair()
    labels = torch.tensor([1, 4])
    out = sample_next_scale(model, tok, labels, cfg=2.0, top_k=5, top_p=0.5, generator=gen(3))
    cond, uncond = _teacher_forced_cond_uncond(model, tok, labels, out.tokens)
    for si, (begin, end) in enumerate(model.begin_ends):
        guided = apply_cfg(cond[:, begin:end], uncond[:, begin:end], 1 + 2.0 * si / 3)
        allowed = torch.isfinite(top_k_top_p_filter(guided, 5, 0.5))
        picked = allowed.gather(-1, out.tokens[si].flatten(1).unsqueeze(-1))
        assert picked.all(), f"scale {si}"


@pytest.mark.parametrize("labels", [[10 + 1], [-1], [0, 99]])
def test_class_id_out_of_range_is_named(labels):
    tok, model = tiny_var_pair()
    with pytest.raises(ClassIdError, match="out of range"):
        sample_next_scale(model, tok, labels, generator=gen(0))


def test_null_class_is_allowed_for_unconditional_sampling():
    tok, model = tiny_var_pair()
    out = sample_next_scale(model, tok, [model.null_class], generator=gen(0))
    assert out.images.shape[0] == 1


@pytest.mark.parametrize("kwargs,match", [({"cfg": -1.0}, "cfg"), ({"top_p": 1.5}, "top_p"),
                                          ({"top_k": -3}, "top_k"), ({"temperature": 0.0}, "temperature")])
def test_out_of_range_knobs_are_named(kwargs, match):
    tok, model = tiny_var_pair()
    with pytest.raises(ConfigError, match=match):
        sample_next_scale(model, tok, [1], generator=gen(0), **kwargs)


def test_non_finite_logits_are_reported():
    tok, model = tiny_var_pair()
    with torch.no_grad():
        model.head.bias[3] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match="scale 0"):
        sample_next_scale(model, tok, [1], generator=gen(0))


def test_tokenizer_of_another_schedule_is_rejected():
    from var.models import create
    _, model = tiny_var_pair()
    other = create("msvq_tiny", patch_nums=(1, 2, 4))
    with pytest.raises(ConfigError, match="patch_nums"):
        sample_next_scale(model, other, [1], generator=gen(0))
