"""GPU tier: models, every sampler (Infinity too) and every cache policy end to end on CUDA with a CUDA generator
(``pytest -m gpu``); ScaleKV/HACK decide the same on CUDA as on the CPU."""
import dataclasses

import pytest
import torch

from helpers import random_indices, tiny_var_pair
from var.kernels import H2O, HACK, CompressedKVCache, ScaleKV, SnapKV, StreamingLLM
from var.samplers.calibration import calibrate
from var.models import create
from var.models import nar_ctf_presets  # noqa: F401  (registers nar_tiny and the ctf_* presets)
from var.models.ctf import kmeans_codebook
from var.samplers import (sample_gsd, sample_lantern, sample_mcsjd, sample_next_scale, sample_next_token, sample_sjd,
                          sample_zipar)
from var.samplers.coarse_to_fine import sample_coarse_to_fine
from var.samplers.collaborative import sample_collaborative
from var.samplers.neighbor_nar import sample_nar

pytestmark = pytest.mark.gpu

POLICIES = {"scalekv": ScaleKV, "hack": HACK, "snapkv": SnapKV, "h2o": H2O, "streamingllm": StreamingLLM}


def _cached_logits(model, tok, labels, idx, cache):
    """Scale-by-scale logits through ``cache`` feeding the ground-truth tokens (what the sampler computes)."""
    cond = model.class_condition(labels)
    pn0 = tok.patch_nums[-1]
    x, out = model.first_scale_input(cond), []
    f_hat = torch.zeros(len(labels), tok.embed_dim, pn0, pn0, device=labels.device)
    for si in range(len(tok.patch_nums)):
        out.append(model.forward_scale(x, cond, cache).float())
        f_hat, nxt = tok.next_scale_input(si, f_hat, tok.embed(idx[si]).float())
        if si + 1 < len(tok.patch_nums):
            x = model.scale_input(si + 1, nxt.flatten(2).transpose(1, 2))
    return torch.cat(out, dim=1)


@torch.no_grad()
def test_cached_vs_teacher_forced_logits_bf16(device):
    """Tolerance: under bf16 autocast the cached logits (full cache in bf16, and the compressed cache keeping
    everything through the kernel) are within 2x of teacher forcing's own bf16 error against fp32."""
    tok, model = tiny_var_pair()
    tok, model = tok.to(device), model.to(device)
    labels = torch.tensor([0, 3, 9, 10], device=device)
    idx = [i.to(device) for i in random_indices(tok, 4)]
    exact = model.teacher_forcing_logits(tok, labels, idx).float()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        tf_err = (model.teacher_forcing_logits(tok, labels, idx).float() - exact).abs().max().item()
        full = model.new_kv_cache(4, dtype=torch.bfloat16)
        c = model.config
        comp = CompressedKVCache(c.depth, 4, c.num_heads, c.width // c.num_heads, capacity=full.capacity,
                                 dtype=torch.bfloat16, device=device, keep_last_scale=True)
        for cache in (full, comp):
            err = (_cached_logits(model, tok, labels, idx, cache) - exact).abs().max().item()
            assert err <= 2 * max(tf_err, 1e-3), (type(cache).__name__, err, tf_err)


def _var(device):
    tok, model = tiny_var_pair()
    return model.to(device), tok.to(device)


def _gpt(device):
    torch.manual_seed(0)
    gpt = create("gpt_tiny").eval()
    torch.nn.init.normal_(gpt.output.weight, std=0.5)
    return gpt.to(device), create("vq_tiny").eval().to(device)


def _check(out, vocab, decoded=True):
    tokens = out.tokens if isinstance(out.tokens, (list, tuple)) else [out.tokens]
    for t in tokens:
        assert t.min() >= 0 and t.max() < vocab
    if decoded and out.images is not None:
        assert torch.isfinite(out.images).all() and 0 <= out.images.min() and out.images.max() <= 1
    assert out.stats.forward_passes > 0 and out.stats.peak_kv_cache_bytes > 0


def _same(a, b):
    a = a.tokens if isinstance(a.tokens, (list, tuple)) else [a.tokens]
    b = b.tokens if isinstance(b.tokens, (list, tuple)) else [b.tokens]
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


NEXT_TOKEN = {
    "next_token": (sample_next_token, {}),
    "sjd": (sample_sjd, dict(window=8)),
    "mcsjd": (sample_mcsjd, dict(window=8)),
    "lantern": (sample_lantern, dict(window=8, k=5, delta=0.2)),
    "gsd": (sample_gsd, dict(window=8, group_size=4)),
    "zipar": (sample_zipar, {}),
}


@pytest.mark.parametrize("name", sorted(NEXT_TOKEN))
@torch.no_grad()
def test_next_token_samplers_end_to_end(device, gen, name):
    sampler, kwargs = NEXT_TOKEN[name]
    gpt, vq = _gpt(device)
    labels = [0, 3, 7]
    a = sampler(gpt, vq, labels, cfg_scale=2.0, top_k=20, generator=gen(1), **kwargs)
    b = sampler(gpt, vq, labels, cfg_scale=2.0, top_k=20, generator=gen(1), **kwargs)
    _check(a, gpt.vocab_size)
    assert a.tokens.device.type == device.type and _same(a, b)


@torch.no_grad()
def test_next_scale_end_to_end_and_under_bf16_autocast(device, gen):
    model, tok = _var(device)
    out = sample_next_scale(model, tok, [1, 2, 3], cfg=1.5, generator=gen(0))
    _check(out, tok.vocab_size)
    assert _same(out, sample_next_scale(model, tok, [1, 2, 3], cfg=1.5, generator=gen(0)))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        _check(sample_next_scale(model, tok, [1, 2, 3], cfg=1.5, generator=gen(0)), tok.vocab_size)


@torch.no_grad()
def test_nar_ctf_and_code_end_to_end(device, gen):
    torch.manual_seed(0)
    nar = create("nar_tiny").eval()
    with torch.no_grad():
        nar.output.weight.normal_(0, 0.5)
        nar.medusa_output.weight.normal_(0, 0.5)
    nar, vq = nar.to(device), create("vq_tiny").eval().to(device)
    out = sample_nar(nar, vq, [0, 3, 10], cfg_scale=2.0, top_k=10, generator=gen(0))
    _check(out, nar.vocab_size)
    assert _same(out, sample_nar(nar, vq, [0, 3, 10], cfg_scale=2.0, top_k=10, generator=gen(0)))

    stage1, stage2 = create("ctf_stage1_tiny").eval(), create("ctf_stage2_tiny").eval()
    stage2.set_clusters(kmeans_codebook(torch.randn(stage2.vocab_size, 8), stage2.config.num_coarse, seed=0))
    for m in (stage1, stage2):
        m.output.weight.data.normal_(0, 0.5)
    stage1, stage2 = stage1.to(device), stage2.to(device)
    out = sample_coarse_to_fine(stage1, stage2, vq, [0, 3], generator=gen(2))
    _check(out, stage2.vocab_size)

    torch.manual_seed(1)
    drafter = create("var_tiny", depth=3, width=96, num_heads=6).eval().to(device)
    refiner = create("var_tiny").eval().to(device)
    tok = create("msvq_tiny").eval().to(device)
    out = sample_collaborative(drafter, refiner, tok, [0, 3, 9], draft_steps=2, generator=gen(3))
    _check(out, tok.vocab_size)
    assert out.stats.extra["refiner_passes"] > 0


@torch.no_grad()
def test_infinity_end_to_end(device, gen):
    from infinity_helpers import TINY_SCHEDULE, random_text, tiny_infinity, tiny_vae
    from var.samplers.infinity import sample_infinity

    vae, model = tiny_vae().to(device), tiny_infinity().to(device)
    runs = [sample_infinity(model, vae, random_text(3), schedule=TINY_SCHEDULE, cfg_list=2.0, tau_list=0.7,
                            generator=gen(4), cache=StreamingLLM(budget=0.5)) for _ in range(2)]
    assert _same(*runs) and runs[0].images.device.type == device.type
    assert torch.isfinite(runs[0].images).all() and 0 <= runs[0].images.min() and runs[0].images.max() <= 1
    assert runs[0].stats.forward_passes == len(TINY_SCHEDULE.grids) and runs[0].stats.peak_kv_live_bytes > 0


@pytest.fixture(scope="module")
def var_and_profile():
    torch.manual_seed(0)
    model = create("var_tiny", num_heads=2).eval()  # head dim 32
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    tok = create("msvq_tiny").eval()
    return model, tok, calibrate(model, tok, [0, 3, 5])


@pytest.mark.parametrize("name", sorted(POLICIES))
@torch.no_grad()
def test_every_cache_policy_end_to_end(device, gen, var_and_profile, name):
    model, tok, profile = var_and_profile
    model, tok = model.to(device), tok.to(device)
    kwargs = {"profile": profile} if name in ("scalekv", "hack") else {}
    full = sample_next_scale(model, tok, [1, 4, 7], cfg=1.5, generator=gen(5))
    for budget in (0.1, 1.0):
        runs = [sample_next_scale(model, tok, [1, 4, 7], cfg=1.5, generator=gen(5),
                                  cache=POLICIES[name](budget=budget, **kwargs)) for _ in range(2)]
        _check(runs[0], tok.vocab_size)
        assert _same(*runs)
        if budget < 1:
            assert runs[0].stats.peak_kv_live_bytes < full.stats.peak_kv_live_bytes


class _Recorder:
    """Wraps a policy and keeps every SelectionContext it was asked about (tensors cloned)."""

    def __init__(self, policy):
        self.policy, self.tracks_scores, self.contexts = policy, policy.tracks_scores, []

    def wants_selection(self, layer, start, n, max_key_len):
        return self.policy.wants_selection(layer, start, n, max_key_len)

    def select(self, ctx):
        self.contexts.append(dataclasses.replace(ctx, **{f.name: getattr(ctx, f.name).clone()
                                                         for f in dataclasses.fields(ctx)
                                                         if isinstance(getattr(ctx, f.name), torch.Tensor)}))
        return self.policy.select(ctx)


def _to(ctx, device):
    return dataclasses.replace(ctx, **{f.name: getattr(ctx, f.name).to(device) for f in dataclasses.fields(ctx)
                                       if isinstance(getattr(ctx, f.name), torch.Tensor)})


@pytest.mark.parametrize("name", ["scalekv", "hack"])
@torch.no_grad()
def test_scalekv_and_hack_select_the_same_on_cuda_as_on_cpu(device, var_and_profile, name):
    """Same selection contexts (recorded on the CPU) -> the same kept tokens (and HACK's merged values)."""
    model, tok, profile = var_and_profile
    model, tok = model.cpu(), tok.cpu()
    policy = POLICIES[name](budget=0.3, profile=profile, backend="torch")
    cache = policy.new_cache(model, 3)
    policy = cache.policy  # the copy bound to the model's layout
    recorder = cache.policy = _Recorder(policy)
    c = model.config
    cond = model.class_condition(torch.tensor([1, 2, 10]))
    g = torch.Generator().manual_seed(2)
    x = model.first_scale_input(cond)
    for si, pn in enumerate(c.patch_nums[:-1]):
        model.forward_scale(x, cond, cache)
        nxt = c.patch_nums[si + 1]
        x = model.scale_input(si + 1, torch.randn(3, nxt * nxt, c.latent_channels, generator=g))
    assert recorder.contexts, "the policy was never asked to select"
    compared = 0
    for ctx in recorder.contexts:
        on_cpu, on_dev = policy.select(ctx), policy.select(_to(ctx, device))
        assert (on_cpu is None) == (on_dev is None)  # None: the policy keeps everything at this write
        if on_cpu is None:
            continue
        assert torch.equal(on_cpu.keep_BHP, on_dev.keep_BHP.cpu()), f"layer {ctx.layer}, start {ctx.start}"
        compared += 1
        for field in ("scores_BHP", "k_BHPD", "v_BHPD"):
            a, b = getattr(on_cpu, field), getattr(on_dev, field)
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b.cpu(), rtol=1e-5, atol=1e-5)
    assert compared > 0, "every selection was None: nothing compared"
