"""VAR's next-scale sampler: one forward pass per scale over a preallocated (or compressed) KV cache.

Classifier-free guidance follows VAR: at scale ``si`` of ``SN`` the guided logits are
``(1 + t) * cond - t * uncond`` with ``t = cfg * si / (SN - 1)`` (no guidance at the first scale, ``cfg`` at the
last). So ``cfg = 0`` is conditional-only sampling (and skips the unconditional half entirely).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence, Union

import torch

from var.errors import ConfigError
from var.kernels.kv_cache import FullCache
from var.models.compiled import CompileArg, ScaleStep, compile_spec
from var.samplers.logits import (TEMPERATURE_ORDERS, FiniteCheck, GeneratorArg, apply_cfg, check_guidance,
                                 check_sampling_args, gumbel_softmax, multinomial, processed_logits)
from var.samplers.stats import SampleOutput, SamplerStats

PerScale = Union[float, int, Sequence[float], Sequence[int]]


def as_label_tensor(labels, device) -> torch.Tensor:
    """Accept an int sequence or a tensor of class ids -> LongTensor ``[B]`` on ``device``."""
    if isinstance(labels, torch.Tensor):
        return labels.to(device=device)
    return torch.as_tensor(list(labels), dtype=torch.long, device=device)


@dataclass
class ScaleSampling:
    """Per-scale sampling knobs (lists of length ``num_scales``); ``cfg[si]`` is the guidance ``t`` at scale si,
    applied as ``(1 + t) * cond - t * uncond``."""

    temperature: list
    top_k: list
    top_p: list
    cfg: list
    temperature_order: str = "before_filter"  # VAR divides by the temperature, then filters (CoDe: after_filter)

    @property
    def guided(self) -> bool:
        return any(t > 0 for t in self.cfg)

    @classmethod
    def build(cls, num_scales: int, *, cfg: PerScale, top_k: PerScale, top_p: PerScale,
              temperature: PerScale, temperature_order: str = "before_filter") -> "ScaleSampling":
        """Scalars are broadcast (a scalar ``cfg`` is VAR's ramp ``cfg * si / (SN - 1)``); sequences must have
        one entry per scale. ``temperature_order``: see :func:`~var.samplers.logits.processed_logits`."""
        if temperature_order not in TEMPERATURE_ORDERS:
            raise ConfigError(f"temperature_order must be one of {TEMPERATURE_ORDERS}, got {temperature_order!r}")

        def per_scale(value, name):
            if isinstance(value, (int, float)):
                return [value] * num_scales
            values = list(value)
            if len(values) != num_scales:
                raise ConfigError(f"{name} has {len(values)} entries, the models have {num_scales} scales")
            return values

        if isinstance(cfg, (int, float)):
            check_guidance(cfg, 0.0, "VAR convention: 0 = no guidance")
            cfg_t = [cfg * (si / (num_scales - 1) if num_scales > 1 else 1.0) for si in range(num_scales)]
        else:
            cfg_t = per_scale(cfg, "cfg")
            if any(not t >= 0 for t in cfg_t):
                raise ConfigError(f"per-scale cfg values must be >= 0, got {cfg_t}")
        sampling = cls(per_scale(temperature, "temperature"), per_scale(top_k, "top_k"), per_scale(top_p, "top_p"),
                       [float(t) for t in cfg_t], temperature_order)
        for k, p, t in zip(sampling.top_k, sampling.top_p, sampling.temperature):
            check_sampling_args(k, p, t)
        return sampling

    def logits(self, guided_logits: torch.Tensor, si: int) -> torch.Tensor:
        """The logits whose softmax is scale ``si``'s sampling distribution (temperature and filters in order)."""
        return processed_logits(guided_logits, temperature=self.temperature[si], top_k=self.top_k[si],
                                top_p=self.top_p[si], temperature_order=self.temperature_order)


def class_conditions(model, labels_B: torch.Tensor, guided: bool) -> torch.Tensor:
    """Class embeddings of the model batch: ``[labels; null]`` with guidance, else ``labels``."""
    cond_BD = model.class_condition(labels_B)
    if guided:
        cond_BD = torch.cat((cond_BD, model.class_condition(torch.full_like(labels_B, model.null_class))))
    return cond_BD


def scale_input(model, si: int, latent_BlCv: torch.Tensor, guided: bool) -> torch.Tensor:
    """The model input of scale ``si`` from the tokenizer's next-scale latent, repeated for the null-class rows."""
    x_BlC = model.scale_input(si, latent_BlCv)
    return torch.cat((x_BlC, x_BlC)) if guided else x_BlC


def sample_scale(logits_rlV: torch.Tensor, si: int, tokenizer, f_hat_BChw: torch.Tensor, sampling: ScaleSampling,
                 *, generator: GeneratorArg = None, more_smooth: bool = False, forced_Bhw: torch.Tensor | None = None,
                 finite: FiniteCheck | None = None):
    """One VAR scale step after the forward pass: guide, filter and draw scale ``si`` from its logits
    ``[rows, pn*pn, V]``, add its codes to ``f_hat`` and return ``(idx [B, pn, pn], f_hat, next latent
    [B, pn'*pn', Cvae])`` (the next scale's tokenizer input; ``f_hat`` itself after the last scale).

    ``forced_Bhw`` (teacher forcing) takes these tokens instead of a draw. Shapes depend only on the scale, so the
    step is the same program for every batch (``torch.compile`` friendly). ``finite``: the loop's deferred
    finiteness check (None: checked here at once, one host synchronisation).
    """
    pn, num_scales = tokenizer.patch_nums[si], len(tokenizer.patch_nums)
    B = f_hat_BChw.shape[0]
    if forced_Bhw is not None:
        h_BChw = tokenizer.embed(forced_Bhw).float().contiguous()
        f_hat_BChw, next_BChw = tokenizer.next_scale_input(si, f_hat_BChw, h_BChw)
        return forced_Bhw.reshape(B, pn, pn), f_hat_BChw, next_BChw.flatten(2).transpose(1, 2)
    finite = finite or FiniteCheck(deferred=False)
    finite.update(logits_rlV, f"scale {si} (pn={pn})")
    logits = apply_cfg(logits_rlV[:B], logits_rlV[B:], 1 + sampling.cfg[si]) if sampling.guided else logits_rlV
    logits = sampling.logits(logits, si)
    idx_Bl = multinomial(logits.softmax(dim=-1), generator, finite=finite)
    if more_smooth:  # VAR's visualisation trick: a Gumbel-softmax mixture of codes instead of the drawn code
        ratio = si / (num_scales - 1) if num_scales > 1 else 1.0
        tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
        if sampling.temperature_order == "after_filter":  # the CoDe release smooths the untempered logits
            logits = logits * sampling.temperature[si]
        h_BChw = tokenizer.embed_soft(gumbel_softmax(logits * (1 + ratio), tau, generator))
    else:
        # contiguous: the resampling kernels of next_scale_input then read the codes in the usual memory order
        h_BChw = tokenizer.embed(idx_Bl).float().contiguous()
    f_hat_BChw, next_BChw = tokenizer.next_scale_input(si, f_hat_BChw, h_BChw)
    return idx_Bl.view(B, pn, pn), f_hat_BChw, next_BChw.flatten(2).transpose(1, 2)


@torch.no_grad()
def sample_next_scale(model, tokenizer, labels_B, *, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
                      temperature: float = 1.0, more_smooth: bool = False, generator: GeneratorArg = None,
                      cache=None, decode: bool = True, compile: CompileArg = False) -> SampleOutput:
    """Sample ``len(labels_B)`` images class-conditionally with a VAR model and its multi-scale tokenizer.

    Args:
        labels_B: class ids ``[B]`` in ``[0, num_classes]`` (``num_classes`` = unconditional).
        cfg: VAR guidance strength at the last scale (ramped linearly from 0); 0 = no guidance.
        top_k, top_p, temperature: logits filtering (0 disables top-k; 0 or 1 disables top-p).
        more_smooth: VAR's Gumbel-softmax smoothing of the codes (for visualisation, not FID).
        generator: one ``torch.Generator`` or a list with one per sample (a batch of N then equals N runs).
        cache: a cache policy with ``new_cache(model, batch, dtype=, device=)`` (default: the full cache).
        decode: decode the tokens to images (otherwise ``images`` is None).
        compile: compile the scale step (:mod:`var.models.compiled`: one graph per scale, CUDA graphs on CUDA; the
            full cache only, kept for the next sample of that batch size); ``True``, or a ``torch.compile`` backend
            name. The draws stay eager, so a seeded run gives the eager tokens up to the compiled logits' rounding.
    Returns:
        :class:`SampleOutput` with ``images [B, 3, H, W]`` in [0, 1], ``tokens`` (list of ``[B, pn, pn]``), stats.
    """
    t0 = time.perf_counter()
    cfg_model = model.config
    device = model.head.weight.device
    labels_B = as_label_tensor(labels_B, device)
    model.check_labels(labels_B)
    if tuple(tokenizer.patch_nums) != tuple(cfg_model.patch_nums) or tokenizer.vocab_size != cfg_model.vocab_size:
        raise ConfigError(f"tokenizer (patch_nums {tokenizer.patch_nums}, V {tokenizer.vocab_size}) does not match "
                          f"the model (patch_nums {cfg_model.patch_nums}, V {cfg_model.vocab_size})")

    B = labels_B.shape[0]
    sampling = ScaleSampling.build(len(cfg_model.patch_nums), cfg=cfg, top_k=top_k, top_p=top_p,
                                   temperature=temperature)
    cond_BD = class_conditions(model, labels_B, sampling.guided)
    step = ScaleStep(model, compile_spec(compile))
    kv_cache = step.new_cache(cache or FullCache(), cond_BD.shape[0], device)
    stats = SamplerStats()
    finite = FiniteCheck()  # read back once, after the last scale: no host synchronisation inside the loop

    n = cfg_model.patch_nums[-1]
    x_BlC = model.first_scale_input(cond_BD)
    f_hat = torch.zeros(B, tokenizer.embed_dim, n, n, device=device)
    tokens = []
    for si in range(len(cfg_model.patch_nums)):
        logits = step(x_BlC, cond_BD, kv_cache)  # [rows, pn*pn, V]
        stats.forward_passes += 1
        stats.track_kv(kv_cache)
        idx_Bhw, f_hat, next_BlCv = sample_scale(logits, si, tokenizer, f_hat, sampling, generator=generator,
                                                 more_smooth=more_smooth, finite=finite)
        tokens.append(idx_Bhw)
        if si + 1 < len(cfg_model.patch_nums):
            x_BlC = scale_input(model, si + 1, next_BlCv, sampling.guided)
    finite.raise_if_failed()
    stats.tokens = cfg_model.seq_len
    images = tokenizer.latent_to_image(f_hat).add(1).mul(0.5) if decode else None
    stats.wall_time_s = time.perf_counter() - t0
    return SampleOutput(images=images, tokens=tokens, stats=stats)
