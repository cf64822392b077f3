"""CoDe (collaborative drafter/refiner decoding) on two tiny VARs of different widths sharing msvq_tiny."""
import pytest
import torch

from var.errors import ConfigError
from var.kernels.kv_cache import FullCache, KVCache
from var.models import create
from var.samplers.collaborative import (DraftHandoff, _refiner_prefill, code_preset, paper_temperatures,
                                        sample_collaborative)
from var.samplers.next_scale import ScaleSampling
from var.samplers.logits import top_k_top_p_filter
from var.samplers.next_scale import sample_next_scale

NUM_SCALES = 4


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(1)
    drafter = create("var_tiny", depth=3, width=96, num_heads=6).eval()
    refiner = create("var_tiny").eval()
    tok = create("msvq_tiny").eval()
    return drafter, refiner, tok


def gen(seed=7, n=None):
    if n is None:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


LABELS = [0, 3, 9, 10]
KNOBS = dict(cfg=2.0, top_k=20, top_p=0.9, temperature=1.2)


def same_tokens(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


def test_all_scales_drafted_equals_drafter(models):
    drafter, refiner, tok = models
    ref = sample_next_scale(drafter, tok, LABELS, generator=gen(), **KNOBS)
    out = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=NUM_SCALES, generator=gen(),
                               temperature_order="before_filter", **KNOBS)  # next_scale's (VAR/LlamaGen) order
    assert same_tokens(out.tokens, ref.tokens)
    torch.testing.assert_close(out.images, ref.images)
    assert out.stats.forward_passes == NUM_SCALES and out.stats.extra["refiner_passes"] == 0


def test_zero_drafted_equals_refiner(models):
    drafter, refiner, tok = models
    ref = sample_next_scale(refiner, tok, LABELS, generator=gen(n=4), **KNOBS)
    out = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=0, generator=gen(n=4),
                               temperature_order="before_filter", **KNOBS)
    assert same_tokens(out.tokens, ref.tokens)
    torch.testing.assert_close(out.images, ref.images)
    assert out.stats.extra["drafter_passes"] == 0 and "drafter_peak_kv_cache_bytes" not in out.stats.extra


def test_drafter_and_refiner_differ(models):
    """Guard against a vacuous test: the two models do sample different tokens from the same seed."""
    drafter, refiner, tok = models
    a = sample_next_scale(drafter, tok, LABELS, generator=gen(), decode=False, **KNOBS)
    b = sample_next_scale(refiner, tok, LABELS, generator=gen(), decode=False, **KNOBS)
    assert not same_tokens(a.tokens, b.tokens)


@pytest.mark.parametrize("prefill", ["one_pass", "per_scale"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_same_model_on_both_sides_equals_plain_sampler(models, n, prefill):
    """A hand-over to the same model must not change anything: the rebuilt cache equals the incremental one."""
    drafter, _, tok = models
    ref = sample_next_scale(drafter, tok, LABELS, generator=gen(3), decode=False, **KNOBS)
    out = sample_collaborative(drafter, drafter, tok, LABELS, draft_steps=n, generator=gen(3), prefill=prefill,
                               decode=False, temperature_order="before_filter", **KNOBS)
    assert same_tokens(out.tokens, ref.tokens)
    passes = NUM_SCALES if prefill == "one_pass" else NUM_SCALES + n
    assert out.stats.forward_passes == passes and out.stats.extra["prefill"] == prefill


@pytest.mark.parametrize("n", [1, 2, 3])
def test_one_pass_prefill_matches_per_scale_and_teacher_forcing(models, n):
    drafter, refiner, tok = models
    B = 3
    labels = torch.tensor([1, 2, 10])
    idx = [torch.randint(0, 64, (B, pn, pn)) for pn in tok.patch_nums]
    inputs = tok.teacher_forcing_input(idx)  # [B, L-1, Cvae]
    ends = [e for _, e in refiner.begin_ends]
    handoff = DraftHandoff(torch.zeros(B, 8, 4, 4), [inputs[:, ends[si - 1] - 1:ends[si] - 1] for si in
                                                      range(1, n + 1)], idx[:n])
    cond = refiner.class_condition(labels)
    with torch.no_grad():
        one, passes_one = _refiner_prefill(refiner, cond, handoff, refiner.new_kv_cache(B), "one_pass", False)
        cache = refiner.new_kv_cache(B)
        per, passes_per = _refiner_prefill(refiner, cond, handoff, cache, "per_scale", False)
        tf = refiner(labels, inputs)
    begin, end = refiner.begin_ends[n]
    torch.testing.assert_close(one, per, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one, tf[:, begin:end], atol=1e-5, rtol=1e-5)
    assert (passes_one, passes_per) == (1, n + 1) and cache.length == end


def test_per_scale_schedule(models):
    drafter, refiner, tok = models
    scalar = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=2, generator=gen(), decode=False,
                                  **KNOBS)
    listed = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=2, generator=gen(), decode=False,
                                  cfg=[2.0 * si / 3 for si in range(4)], top_k=[20] * 4, top_p=[0.9] * 4,
                                  temperature=[1.2] * 4)
    assert same_tokens(scalar.tokens, listed.tokens)
    greedy_tail = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=2, generator=gen(),
                                       decode=False, cfg=2.0, top_k=[20, 20, 1, 1], top_p=0.9, temperature=1.2)
    assert same_tokens(greedy_tail.tokens[:2], scalar.tokens[:2])


def test_schedule_validation(models):
    drafter, refiner, tok = models
    assert paper_temperatures(10) == [1.1] * 7 + [1.0] * 3
    sched = ScaleSampling.build(4, cfg=3.0, top_k=0, top_p=0.0, temperature=1.0)
    assert sched.cfg == [0.0, 1.0, 2.0, 3.0] and sched.guided
    with pytest.raises(ConfigError, match="temperature has 3 entries"):
        sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=2, temperature=[1.0] * 3)
    with pytest.raises(ConfigError, match="draft_steps"):
        sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=5)
    with pytest.raises(ConfigError, match="cfg"):
        sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=2, cfg=-1.0)
    with pytest.raises(ConfigError, match="prefill"):
        sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=2, prefill="two_pass")
    other = create("var_tiny", num_classes=5)
    with pytest.raises(ConfigError, match="class counts"):
        sample_collaborative(drafter, other, tok, [0], draft_steps=2)
    wide_vocab = create("var_tiny", vocab_size=128)
    with pytest.raises(ConfigError, match="does not match the tokenizer"):
        sample_collaborative(drafter, wide_vocab, tok, [0], draft_steps=2)


class _PerScaleOnlyCache(KVCache):
    """Stands in for a compressed cache that cannot take a multi-scale masked write."""

    supports_block_prefill = False
    writes = []

    def attend(self, layer, q, k, v, *, scale, attn_mask=None):
        assert attn_mask is None
        if layer == 0:
            self.writes.append(q.shape[2])
        return super().attend(layer, q, k, v, scale=scale)


class _RecordingPolicy:
    def __init__(self, cache_cls=KVCache):
        self.cache_cls, self.widths = cache_cls, []

    def new_cache(self, model, batch, *, dtype=None, device=None):
        c = model.config
        self.widths.append(c.width)
        return self.cache_cls(c.depth, batch, c.num_heads, c.seq_len, c.width // c.num_heads)


def test_cache_policies_on_both_models(models):
    drafter, refiner, tok = models
    plain = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=2, generator=gen(), decode=False,
                                 **KNOBS)
    policy = _RecordingPolicy()
    out = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=2, generator=gen(), decode=False,
                               cache=policy, **KNOBS)
    assert policy.widths == [96, 64] and out.stats.extra["prefill"] == "one_pass"
    assert same_tokens(out.tokens, plain.tokens)
    _PerScaleOnlyCache.writes = []
    out = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=2, generator=gen(), decode=False,
                               drafter_cache=FullCache(), refiner_cache=_RecordingPolicy(_PerScaleOnlyCache),
                               **KNOBS)
    assert out.stats.extra["prefill"] == "per_scale" and _PerScaleOnlyCache.writes == [1, 4, 9, 16]
    assert same_tokens(out.tokens, plain.tokens)


def test_stats_account_both_caches(models):
    drafter, refiner, tok = models
    out = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=2, generator=gen(), decode=False,
                               **KNOBS)
    ex = out.stats.extra
    assert ex["drafter_passes"] == 2 and ex["refiner_passes"] == 2 and out.stats.forward_passes == 4
    assert ex["prefill_tokens"] == 1 + 4 + 9
    # KV bytes: layers * 2 (K,V) * rows (CFG doubles) * seq_len * width * 4 bytes
    # KV bytes: layers * 2 (K,V) * rows (CFG doubles) * tokens * width * 4 bytes; the drafter holds 2 scales only
    assert ex["drafter_peak_kv_cache_bytes"] == 3 * 2 * 8 * (1 + 4) * 96 * 4
    assert ex["refiner_peak_kv_cache_bytes"] == 2 * 2 * 8 * 30 * 64 * 4
    assert out.stats.peak_kv_cache_bytes == ex["refiner_peak_kv_cache_bytes"]
    full = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=4, generator=gen(), decode=False, **KNOBS)
    assert full.stats.peak_kv_cache_bytes == 3 * 2 * 8 * 30 * 96 * 4


def test_compressed_cache_policies(models):
    """The KV-compression policies plug into both models; at a 100% budget nothing changes."""
    policies = pytest.importorskip("var.kernels.policies")
    drafter, refiner, tok = models
    full = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=2, generator=gen(), decode=False,
                                **KNOBS)
    same = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=2, generator=gen(), decode=False,
                                cache=policies.SnapKV(1.0, backend="torch"), **KNOBS)
    assert same_tokens(same.tokens, full.tokens) and same.stats.extra["prefill"] == "per_scale"
    small = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=2, generator=gen(), decode=False,
                                 cache=policies.SnapKV(0.3, backend="torch"), **KNOBS)
    assert small.stats.extra["refiner_peak_kv_cache_bytes"] < same.stats.extra["refiner_peak_kv_cache_bytes"]


def test_more_smooth_matches_plain_sampler(models):
    drafter, refiner, tok = models
    ref = sample_next_scale(refiner, tok, LABELS, generator=gen(), more_smooth=True, **KNOBS)
    out = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=0, generator=gen(), more_smooth=True,
                               temperature_order="before_filter", **KNOBS)
    assert same_tokens(out.tokens, ref.tokens)
    torch.testing.assert_close(out.images, ref.images)


def test_temperature_order_follows_the_code_release():
    """CoDe's release filters the raw logits (top-k, top-p), then divides by the temperature; VAR/LlamaGen divide
    first. With top-p 0.96 and temperature 1.1 the nuclei differ; both orders are reachable by name."""
    logits = torch.linspace(6.0, -6.0, 400)[None, None] + torch.randn(1, 1, 400, generator=gen(3)) * 0.1
    release = ScaleSampling.build(1, cfg=0.0, top_k=0, top_p=0.96, temperature=1.1, temperature_order="after_filter")
    expected = (top_k_top_p_filter(logits, 0, 0.96) / 1.1).softmax(-1)  # written out, not through the processor
    torch.testing.assert_close(release.logits(logits, 0).softmax(-1), expected)
    var_order = ScaleSampling.build(1, cfg=0.0, top_k=0, top_p=0.96, temperature=1.1)  # VAR's order by default
    assert var_order.temperature_order == "before_filter"
    torch.testing.assert_close(var_order.logits(logits, 0).softmax(-1),
                               top_k_top_p_filter(logits / 1.1, 0, 0.96).softmax(-1))
    kept_release = int((expected > 0).sum())
    kept_var = int((var_order.logits(logits, 0) > float("-inf")).sum())
    assert kept_release < kept_var  # a hotter temperature first widens the nucleus
    with pytest.raises(ConfigError, match="temperature_order"):
        ScaleSampling.build(1, cfg=0.0, top_k=0, top_p=0.9, temperature=1.0, temperature_order="late")


def test_paper_preset(models):
    drafter, refiner, tok = models
    preset = code_preset("paper", NUM_SCALES)
    assert preset["top_k"] == 600 and preset["top_p"] == 0.96 and preset["cfg"] == 1.5
    assert code_preset("paper")["temperature"] == [1.1] * 7 + [1.0] * 3 and code_preset("paper")["draft_steps"] == 8
    out = sample_collaborative(drafter, refiner, tok, LABELS, generator=gen(), decode=False, **preset)
    assert out.stats.extra["draft_steps"] == NUM_SCALES
    with pytest.raises(ConfigError, match="preset"):
        code_preset("fast")


def test_batch_with_per_sample_generators_equals_single_runs(models):
    drafter, refiner, tok = models
    batch = sample_collaborative(drafter, refiner, tok, LABELS, draft_steps=2, generator=gen(20, n=4),
                                 decode=False, **KNOBS)
    for b, label in enumerate(LABELS):
        single = sample_collaborative(drafter, refiner, tok, [label], draft_steps=2,
                                      generator=[torch.Generator().manual_seed(20 + b)], decode=False, **KNOBS)
        assert all(torch.equal(t[b], s[0]) for t, s in zip(batch.tokens, single.tokens))
