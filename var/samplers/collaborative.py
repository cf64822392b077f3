"""CoDe: collaborative decoding of VAR (Chen et al., CVPR 2025) with a large drafter and a small refiner.

The drafter samples the first ``draft_steps`` scales with its own KV cache; the cache is then dropped. What crosses
to the refiner is latent-space state only (the widths of the two models differ, so no K/V can be reused): the
accumulated ``f_hat`` and the per-scale next-scale inputs (:class:`DraftHandoff`). The refiner rebuilds its own
cache in one forward pass over [its start token; its embedding of every drafted scale's input; the input of the
first refined scale] under VAR's block-causal mask (a "prefill"), samples that scale from the last block's logits
and continues like the plain next-scale sampler.

``draft_steps = num_scales`` reproduces ``sample_next_scale(drafter)`` token for token and ``draft_steps = 0``
reproduces ``sample_next_scale(refiner)`` (same seed, ``temperature_order="before_filter"``, the next-scale
sampler's order): every scale draws from the generator exactly once, as there.
Sampling knobs may be given per scale (the paper: temperature 1.1 on the first 7 scales, 1.0 on the last 3); by
default the temperature is applied after top-k/top-p, as in the CoDe release (:func:`code_preset`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from var.errors import ConfigError
from var.kernels.kv_cache import FullCache, KVCache
from var.samplers.logits import FiniteCheck, GeneratorArg
from var.samplers.next_scale import (PerScale, ScaleSampling, as_label_tensor, class_conditions, sample_scale,
                                     scale_input)
from var.samplers.stats import SampleOutput, SamplerStats

logger = logging.getLogger(__name__)

PREFILL_MODES = ("auto", "one_pass", "per_scale")


def paper_temperatures(num_scales: int, hot: float = 1.1, cold: float = 1.0, num_cold: int = 3) -> list[float]:
    """CoDe's FID schedule: ``hot`` on all scales but the last ``num_cold``, which use ``cold``."""
    return [hot if si < num_scales - num_cold else cold for si in range(num_scales)]


CODE_PRESETS = ("paper",)


def code_preset(name: str = "paper", num_scales: int = 10) -> dict:
    """Keyword arguments of :func:`sample_collaborative` for a released setting. ``"paper"``: the release's FID
    script (``sample_CoDe.py``): N = 8 drafted scales, cfg 1.5 (VAR ramp), top-k 600 and top-p 0.96 on every scale,
    temperature 1.1 on all but the last 3 scales, filters before the temperature, no ``more_smooth``."""
    if name not in CODE_PRESETS:
        raise ConfigError(f"unknown CoDe preset {name!r}; choose one of {CODE_PRESETS}")
    return dict(draft_steps=min(8, num_scales), cfg=1.5, top_k=600, top_p=0.96,
                temperature=paper_temperatures(num_scales), temperature_order="after_filter", more_smooth=False)


@dataclass
class DraftHandoff:
    """Latent state after the drafted scales: ``f_hat [B, Cvae, n, n]`` and ``inputs_BlCv[si - 1]``, the
    tokenizer input ``[B, pn_si**2, Cvae]`` of scale ``si`` for si = 1..draft_steps (the last one is the input of
    the first refined scale; absent when nothing is left to refine)."""

    f_hat_BChw: torch.Tensor
    inputs_BlCv: list = field(default_factory=list)
    tokens: list = field(default_factory=list)


class _BlockCausalPrefill:
    """Wraps a cache for one multi-scale forward pass: every ``attend`` gets VAR's block-causal mask (boolean,
    True = attend, so it is valid whatever dtype the cache computes attention in)."""

    def __init__(self, cache: KVCache, attn_bias_11LL: torch.Tensor):
        self.cache, self.mask_11LL = cache, attn_bias_11LL == 0

    def attend(self, layer, q_BHlD, k_BHlD, v_BHlD, *, scale, attn_mask=None):
        return self.cache.attend(layer, q_BHlD, k_BHlD, v_BHlD, scale=scale, attn_mask=self.mask_11LL)

    def advance(self, num_tokens: int) -> None:
        self.cache.advance(num_tokens)


def check_pair(drafter, refiner, tokenizer) -> None:
    """Raise :class:`ConfigError` unless both models fit the tokenizer and share classes and scales."""
    for name, model in (("drafter", drafter), ("refiner", refiner)):
        c = model.config
        if tuple(tokenizer.patch_nums) != tuple(c.patch_nums) or tokenizer.vocab_size != c.vocab_size \
                or tokenizer.embed_dim != c.latent_channels:
            raise ConfigError(f"{name} (patch_nums {c.patch_nums}, V {c.vocab_size}, Cvae {c.latent_channels}) "
                              f"does not match the tokenizer (patch_nums {tokenizer.patch_nums}, "
                              f"V {tokenizer.vocab_size}, Cvae {tokenizer.embed_dim})")
    if drafter.config.num_classes != refiner.config.num_classes:
        raise ConfigError(f"drafter and refiner have different class counts "
                          f"({drafter.config.num_classes} vs {refiner.config.num_classes})")


def _prefill_mode(prefill: str, kv_cache) -> str:
    if prefill not in PREFILL_MODES:
        raise ConfigError(f"prefill must be one of {PREFILL_MODES}, got {prefill!r}")
    if prefill != "auto":
        return prefill
    # One masked pass needs a cache that attends densely over what it was given (AttentionCache protocol); caches
    # that select tokens per scale (ScaleKV, HACK) say supports_block_prefill = False.
    return "one_pass" if kv_cache.supports_block_prefill else "per_scale"


def _drafter_cache(policy, drafter, rows: int, num_tokens: int, device):
    """The drafter only ever holds the drafted scales: with the full-cache policy, allocate just those tokens
    (this is where CoDe's memory saving comes from); other policies build their own cache."""
    if policy is not None and type(policy) is not FullCache:
        return policy.new_cache(drafter, rows, device=device)
    c = drafter.config
    return KVCache(c.depth, rows, c.num_heads, num_tokens, c.width // c.num_heads,
                   dtype=drafter.head.weight.dtype, device=device)


def draft(drafter, tokenizer, labels_B, draft_steps: int, sched: ScaleSampling, *, generator: GeneratorArg = None,
          cache=None, more_smooth: bool = False, stats: SamplerStats | None = None,
          finite: FiniteCheck | None = None) -> DraftHandoff:
    """Sample scales ``0 .. draft_steps - 1`` with the drafter's own cache; return the latent hand-over.
    ``finite``: the sample's deferred finiteness check (None: each scale checked at once)."""
    device = drafter.head.weight.device
    B, guided = labels_B.shape[0], sched.guided
    n = tokenizer.patch_nums[-1]
    out = DraftHandoff(torch.zeros(B, tokenizer.embed_dim, n, n, device=device))
    if draft_steps == 0:
        return out
    cond_BD = class_conditions(drafter, labels_B, guided)
    kv_cache = _drafter_cache(cache, drafter, cond_BD.shape[0], drafter.schedule.tokens_through(draft_steps - 1),
                              device)
    x_BlC = drafter.first_scale_input(cond_BD)
    for si in range(draft_steps):
        logits = drafter.forward_scale(x_BlC, cond_BD, kv_cache)
        if stats is not None:
            stats.forward_passes += 1
            stats.extra["drafter_peak_kv_cache_bytes"] = max(stats.extra.get("drafter_peak_kv_cache_bytes", 0),
                                                             kv_cache.nbytes())
        idx, out.f_hat_BChw, next_BlCv = sample_scale(logits, si, tokenizer, out.f_hat_BChw, sched,
                                                      generator=generator, more_smooth=more_smooth, finite=finite)
        out.tokens.append(idx)
        if si + 1 < len(tokenizer.patch_nums):
            out.inputs_BlCv.append(next_BlCv)
        if si + 1 < draft_steps:
            x_BlC = scale_input(drafter, si + 1, next_BlCv, guided)
    return out


def _refiner_prefill(refiner, cond_BD, handoff: DraftHandoff, kv_cache, mode: str, guided: bool):
    """Fill the refiner's cache with scales ``0 .. N`` (N = drafted scales) -> logits of scale N and passes used."""
    N = len(handoff.inputs_BlCv)
    xs = [refiner.first_scale_input(cond_BD)]
    xs += [scale_input(refiner, si, lat, guided) for si, lat in enumerate(handoff.inputs_BlCv, start=1)]
    if mode == "per_scale" or N == 0:
        for x_BlC in xs:
            logits = refiner.forward_scale(x_BlC, cond_BD, kv_cache)
        return logits, len(xs)
    x_BLC = torch.cat(xs, dim=1)
    L = x_BLC.shape[1]
    masked = _BlockCausalPrefill(kv_cache, refiner.attn_bias_for_masking[:, :, :L, :L])
    h_BLC = refiner.forward_blocks(x_BLC, cond_BD, kv_cache=masked)
    return refiner.logits(h_BLC[:, -xs[-1].shape[1]:], cond_BD), 1


def refine(refiner, tokenizer, labels_B, handoff: DraftHandoff, sched: ScaleSampling, *, generator: GeneratorArg = None,
           cache=None, prefill: str = "auto", more_smooth: bool = False,
           stats: SamplerStats | None = None, finite: FiniteCheck | None = None) -> DraftHandoff:
    """Sample the remaining scales with the refiner, starting from the drafter's hand-over; returns the final
    state (``tokens`` holds every scale). ``finite``: as in :func:`draft`."""
    device = refiner.head.weight.device
    B, guided, num_scales = labels_B.shape[0], sched.guided, len(tokenizer.patch_nums)
    start = len(handoff.tokens)
    cond_BD = class_conditions(refiner, labels_B, guided)
    kv_cache = (cache or FullCache()).new_cache(refiner, cond_BD.shape[0], device=device)
    mode = _prefill_mode(prefill, kv_cache)
    f_hat, tokens = handoff.f_hat_BChw, list(handoff.tokens)
    logits, passes = _refiner_prefill(refiner, cond_BD, handoff, kv_cache, mode, guided)
    for si in range(start, num_scales):
        if stats is not None:
            stats.extra["refiner_peak_kv_cache_bytes"] = max(stats.extra.get("refiner_peak_kv_cache_bytes", 0),
                                                             kv_cache.nbytes())
        idx, f_hat, next_BlCv = sample_scale(logits, si, tokenizer, f_hat, sched, generator=generator,
                                             more_smooth=more_smooth, finite=finite)
        tokens.append(idx)
        if si + 1 < num_scales:
            logits = refiner.forward_scale(scale_input(refiner, si + 1, next_BlCv, guided), cond_BD, kv_cache)
            passes += 1
    if stats is not None:
        stats.forward_passes += passes
        stats.extra.update(prefill=mode, refiner_passes=passes, prefill_tokens=tokenizer.schedule.tokens_through(start))
    return DraftHandoff(f_hat, [], tokens)


@torch.no_grad()
def sample_collaborative(drafter, refiner, tokenizer, labels_B, *, draft_steps: int, cfg: PerScale = 1.5,
                         top_k: PerScale = 900, top_p: PerScale = 0.96, temperature: PerScale = 1.0,
                         temperature_order: str = "after_filter", more_smooth: bool = False,
                         generator: GeneratorArg = None, cache=None, drafter_cache=None, refiner_cache=None,
                         prefill: str = "auto", decode: bool = True) -> SampleOutput:
    """CoDe sampling: ``drafter`` samples scales ``[0, draft_steps)``, ``refiner`` the rest.

    Args:
        drafter, refiner: two :class:`~var.models.VAR` models over the same ``tokenizer`` (any widths).
        labels_B: class ids ``[B]`` (``num_classes`` = unconditional).
        draft_steps: N in ``[0, num_scales]``; the paper's default for 10 scales is 8.
        cfg: VAR's guidance ramp end (float) or one guidance value ``t`` per scale.
        top_k, top_p, temperature: a scalar or one value per scale (see :func:`paper_temperatures`).
        temperature_order: ``"after_filter"`` (the CoDe release: top-k/top-p on the raw logits, then the
            temperature) or ``"before_filter"`` (VAR/LlamaGen order); :func:`code_preset` gives the paper's set.
        generator: one ``torch.Generator`` or one per sample.
        cache: cache policy for both models (``new_cache(model, batch, dtype=, device=)``; default full);
            ``drafter_cache`` / ``refiner_cache`` override it per model.
        prefill: how the refiner rebuilds its cache: ``"one_pass"`` (one block-causal pass over all drafted
            scales), ``"per_scale"`` (one cached pass per drafted scale, for caches that select tokens per
            scale) or ``"auto"`` (one pass on a dense :class:`KVCache`, unless the cache says otherwise).
    Returns:
        :class:`SampleOutput`; ``stats.extra`` holds the per-model passes and KV peaks and the prefill mode.
    """
    t0 = time.perf_counter()
    device = drafter.head.weight.device
    labels_B = as_label_tensor(labels_B, device)
    check_pair(drafter, refiner, tokenizer)
    drafter.check_labels(labels_B)
    num_scales = len(tokenizer.patch_nums)
    if not (isinstance(draft_steps, int) and 0 <= draft_steps <= num_scales):
        raise ConfigError(f"draft_steps must be an int in [0, {num_scales}], got {draft_steps!r}")
    sched = ScaleSampling.build(num_scales, cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
                                temperature_order=temperature_order)
    stats = SamplerStats(extra={"draft_steps": draft_steps, "drafter_passes": draft_steps})
    finite = FiniteCheck()  # read back once, after the last scale

    handoff = draft(drafter, tokenizer, labels_B, draft_steps, sched, generator=generator,
                    cache=drafter_cache or cache, more_smooth=more_smooth, stats=stats, finite=finite)
    if draft_steps < num_scales:  # the drafter's cache went out of scope inside draft()
        handoff = refine(refiner, tokenizer, labels_B, handoff, sched, generator=generator,
                         cache=refiner_cache or cache, prefill=prefill, more_smooth=more_smooth, stats=stats,
                         finite=finite)
    else:
        stats.extra.update(refiner_passes=0, prefill="none", prefill_tokens=0)
    stats.peak_kv_cache_bytes = max(stats.extra.get("drafter_peak_kv_cache_bytes", 0),
                                    stats.extra.get("refiner_peak_kv_cache_bytes", 0))
    finite.raise_if_failed()
    stats.tokens = drafter.config.seq_len
    images = tokenizer.latent_to_image(handoff.f_hat_BChw).add(1).mul(0.5) if decode else None
    stats.wall_time_s = time.perf_counter() - t0
    logger.debug("CoDe N=%d: %s", draft_steps, stats.extra)
    return SampleOutput(images=images, tokens=handoff.tokens, stats=stats)
