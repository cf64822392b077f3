"""Infinity's bitwise next-scale sampler: one forward pass per scale, every bit of every token drawn at once.

Per scale ``si`` (grid ``h x w``): the model gives logits ``[B, h*w, 2d]``, read as ``d`` binary choices per token;
``tau_list[si]`` divides them, classifier-free guidance mixes the conditional and unconditional rows with
``cfg_list[si]``
(Infinity's convention ``cfg * cond + (1 - cfg) * uncond``: 1 = no guidance), top-k / top-p filter each bit's
pair of logits, then one draw per bit. The bits become codes ``+-1/sqrt(d)``, are accumulated on the final grid
and resized to the next scale's input (:class:`~var.tokenizers.bsq_vae.BSQVAE`).

``cfg_insertion_layer`` (the released knob): 0 mixes the logits (the released default); ``-k`` mixes the hidden
states after block ``depth - k`` and runs the rest of the network on the mixed state (both halves).
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from var.errors import ConfigError
from var.kernels.kv_cache import FullCache
from var.models.infinity import Infinity, InfinityAtSchedule
from var.models.text_encoder import PromptEmbeddings
from var.samplers.logits import FiniteCheck, GeneratorArg, check_sampling_args, multinomial, rand_like_per_sample
from var.samplers.logits import top_k_top_p_filter
from var.samplers.stats import SampleOutput, SamplerStats
from var.tokenizers.scale_schedules import dynamic_schedule
from var.utils.scales import ScaleSchedule


def per_scale(name: str, value, num_scales: int) -> list[float]:
    """A scalar broadcast to every scale, or a list with one value per scale (the original ignores extra values;
    here they are an error, as for VAR's per-scale lists: a 13-scale list given to a smaller schedule is a mistake)."""
    if isinstance(value, (int, float)):
        return [float(value)] * num_scales
    values = [float(v) for v in value]
    if len(values) != num_scales:
        raise ConfigError(f"{name} has {len(values)} values for {num_scales} scales")
    return values


def text_tensors(text, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``PromptEmbeddings`` or ``(features_BNC, mask_BN)`` -> tensors on ``device``."""
    if isinstance(text, PromptEmbeddings):
        return text.features_BNC.to(device), text.mask_BN.to(device)
    if isinstance(text, (tuple, list)) and len(text) == 2:
        feats, mask = text
        return feats.to(device), mask.to(device=device, dtype=torch.bool)
    raise ConfigError("text must be PromptEmbeddings or (features [B, N, C], mask [B, N]) (encode prompts with "
                      "var.models.text_encoder.TextEncoder)")


def draw_bits(logits_Bl2d: torch.Tensor, *, top_k: int, top_p: float, gumbel: bool,
              generator: GeneratorArg, finite: FiniteCheck | None = None) -> torch.Tensor:
    """One {0, 1} draw per bit from logits ``[B, l, 2d]`` (pairs per bit) -> bits ``[B, l, d]`` int64.
    ``finite``: the sample's deferred finiteness check (None: the draw checks at once)."""
    B, l, two_d = logits_Bl2d.shape
    pairs = top_k_top_p_filter(logits_Bl2d.reshape(B, l * two_d // 2, 2).float(), top_k, top_p)
    if gumbel:  # Gumbel-max: argmax(logits + Gumbel noise) is a draw from softmax(logits)
        u = rand_like_per_sample(pairs.shape, generator, pairs.device).clamp_(1e-20, 1.0)
        bits = (pairs - torch.log(-torch.log(u))).argmax(-1)
    else:
        bits = multinomial(pairs.softmax(-1), generator, finite=finite)  # the original's draws for one generator
    return bits.view(B, l, two_d // 2)


@torch.no_grad()
def sample_infinity(model: Infinity, vae, text, *, schedule: ScaleSchedule | None = None, h_div_w: float = 1.0,
                    pixels: str = "1M", cfg_list: float | Sequence[float] = 3.0,
                    tau_list: float | Sequence[float] = 1.0,
                    top_k: int = 0, top_p: float = 0.0, gumbel: bool = False, cfg_insertion_layer: int = 0,
                    negative=None, generator: GeneratorArg = None, cache=None, decode: bool = True) -> SampleOutput:
    """Sample one image per prompt with an Infinity model and its BSQ VAE.

    Args:
        text: the prompts' T5 features: :class:`PromptEmbeddings` or ``(features [B, N, Ct5], mask [B, N])``.
        schedule: token grids per scale; default ``dynamic_schedule(h_div_w, pixels)`` (13 scales at 1M).
        cfg_list: guidance per scale (a scalar is broadcast), Infinity's ``cfg * cond + (1 - cfg) * uncond``;
            1 = none. The release's name and convention (not VAR's ``cfg``, where 0 = none).
        tau_list: temperature per scale (logits are divided by it; a scalar is broadcast).
        top_k, top_p: filters over each bit's two logits (top_k >= 2 or 0 disables; top_p 0 or 1 disables).
        gumbel: draw with the Gumbel-max trick (same distribution, different random stream; the released code
            accepts this flag but ignores it).
        cfg_insertion_layer: 0 = guidance on the logits; ``-k`` = on the hidden states after block ``depth - k``.
        negative: optional negative-prompt features (same forms as ``text``, one row per prompt) replacing the
            learned unconditional text.
        generator: one ``torch.Generator`` or one per prompt.
        cache: a cache policy (``FullCache()`` default, ``ScaleKV(...)``, ``HACK(...)``, ...).
    Returns:
        :class:`SampleOutput`: ``images [B, 3, H, W]`` in [0, 1], ``tokens`` = bits per scale ``[B, h, w, d]``,
        stats (passes, tokens, peak KV bytes allocated and live, wall time).
    """
    t0 = time.perf_counter()
    device = model.head.weight.device
    feats, mask = text_tensors(text, device)
    schedule = schedule or dynamic_schedule(h_div_w, pixels)
    model.check_schedule(schedule)
    if vae.codebook_dim != model.config.codebook_dim:
        raise ConfigError(f"VAE has {vae.codebook_dim} bits per token, the model {model.config.codebook_dim}")
    check_sampling_args(top_k, top_p, 1.0)
    n = schedule.num_scales
    cfgs, taus = per_scale("cfg_list", cfg_list, n), per_scale("tau_list", tau_list, n)
    if any(not t > 0 for t in taus):
        raise ConfigError(f"tau_list must be > 0 at every scale, got {taus}")
    depth = model.config.depth
    if cfg_insertion_layer > 0 or cfg_insertion_layer <= -depth:
        raise ConfigError(f"cfg_insertion_layer must be 0 (logits) or in [-{depth - 1}, -1] (hidden states after "
                          f"block depth + k), got {cfg_insertion_layer}")
    B = feats.shape[0]
    guided = any(c != 1.0 for c in cfgs)
    if guided:
        if negative is None:
            lengths = mask.sum(-1)
            un_feats, un_mask = model.uncond_features(lengths, feats.shape[1]).to(feats.dtype), mask
        else:
            un_feats, un_mask = text_tensors(negative, device)
            if un_feats.shape[0] != B:
                raise ConfigError(f"{un_feats.shape[0]} negative prompts for {B} prompts")
        N = max(feats.shape[1], un_feats.shape[1])
        pad = torch.nn.functional.pad
        feats = torch.cat((pad(feats, (0, 0, 0, N - feats.shape[1])), pad(un_feats, (0, 0, 0, N - un_feats.shape[1]))))
        mask = torch.cat((pad(mask, (0, N - mask.shape[1])), pad(un_mask, (0, N - un_mask.shape[1]))))
    text_cond = model.encode_text(feats, mask)
    rows = text_cond.cond_BD.shape[0]
    kv_cache = (cache or FullCache()).new_cache(InfinityAtSchedule(model, schedule), rows, device=device)
    stats = SamplerStats()
    finite = FiniteCheck()  # read back once, after the last scale

    x_BlC = model.first_scale_input(text_cond)
    summed, bits_list = None, []
    for si, (h, w) in enumerate(schedule.grids):
        mix = (depth + cfg_insertion_layer, cfgs[si]) if guided and cfg_insertion_layer < 0 and cfgs[si] != 1 else None
        h_BlC = model.forward_scale(x_BlC, text_cond, si, schedule, kv_cache, cfg_mix=mix)
        stats.forward_passes += 1
        stats.track_kv(kv_cache)
        if guided and cfg_insertion_layer == 0 and cfgs[si] != 1:
            logits = model.logits(h_BlC, text_cond.cond_BD) / taus[si]
            logits = cfgs[si] * logits[:B] + (1 - cfgs[si]) * logits[B:]
        else:
            logits = model.logits(h_BlC[:B], text_cond.cond_BD[:B]) / taus[si]
        finite.update(logits, f"scale {si} ({h}x{w})")
        bits = draw_bits(logits, top_k=top_k, top_p=top_p, gumbel=gumbel, generator=generator,
                         finite=finite).view(B, h, w, -1)
        bits_list.append(bits)
        summed = vae.add_scale(summed, bits, schedule.grids[-1])
        if si + 1 < n:
            x_BlC = model.scale_input(vae.scale_input(summed, schedule.grids[si + 1]))
            if rows != B:
                x_BlC = torch.cat((x_BlC, x_BlC))
    finite.raise_if_failed()
    stats.tokens = schedule.seq_len
    images = vae.decode_latent(summed).add(1).mul(0.5) if decode else None
    stats.wall_time_s = time.perf_counter() - t0
    return SampleOutput(images=images, tokens=bits_list, stats=stats)


def calibrate_infinity(model: Infinity, vae, text, *, schedule: ScaleSchedule | None = None, cfg_list=3.0,
                       seed: int = 0, topk_frac: float = 0.1, **sampler_kwargs):
    """ScaleKV/HACK calibration on Infinity: one full-cache run over a few prompts at ``schedule``; the profile
    is tied to that schedule's layout (pass the same schedule when sampling with the calibrated policy)."""
    from var.kernels.policies.base import CacheLayout
    from var.kernels.policies.calibration import record_profile

    schedule = schedule or dynamic_schedule(sampler_kwargs.pop("h_div_w", 1.0), sampler_kwargs.pop("pixels", "1M"))
    view = InfinityAtSchedule(model, schedule)
    generator = torch.Generator(device=model.head.weight.device).manual_seed(seed)

    def run(policy):
        sample_infinity(model, vae, text, schedule=schedule, cfg_list=cfg_list, generator=generator, cache=policy,
                        decode=False, **sampler_kwargs)

    return record_profile(CacheLayout.of(view), run, topk_frac=topk_frac,
                          meta={"family": "infinity", "scales": [list(hw) for hw in schedule.grids], "seed": seed})
