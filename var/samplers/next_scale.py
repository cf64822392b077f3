"""VAR's next-scale sampler: one forward pass per scale over a preallocated (or compressed) KV cache.

Classifier-free guidance follows VAR: at scale ``si`` of ``SN`` the guided logits are
``(1 + t) * cond - t * uncond`` with ``t = cfg * si / (SN - 1)`` (no guidance at the first scale, ``cfg`` at the
last). So ``cfg = 0`` is conditional-only sampling (and skips the unconditional half entirely).
"""
from __future__ import annotations

import time

import torch

from var.errors import ConfigError
from var.kernels.kv_cache import FullCache
from var.samplers.logits import (GeneratorArg, apply_cfg, check_finite, check_sampling_args, gumbel_softmax,
                                 multinomial, processed_logits)
from var.samplers.stats import SampleOutput, SamplerStats


def as_label_tensor(labels, device) -> torch.Tensor:
    """Accept an int sequence or a tensor of class ids -> LongTensor ``[B]`` on ``device``."""
    if isinstance(labels, torch.Tensor):
        return labels.to(device=device)
    return torch.as_tensor(list(labels), dtype=torch.long, device=device)


@torch.no_grad()
def sample_next_scale(model, tok, labels_B, *, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
                      temperature: float = 1.0, more_smooth: bool = False, generator: GeneratorArg = None,
                      cache=None, decode: bool = True) -> SampleOutput:
    """Sample ``len(labels_B)`` images class-conditionally with a VAR model and its multi-scale tokenizer.

    Args:
        labels_B: class ids ``[B]`` in ``[0, num_classes]`` (``num_classes`` = unconditional).
        cfg: VAR guidance strength at the last scale (ramped linearly from 0); 0 = no guidance.
        top_k, top_p, temperature: logits filtering (0 disables top-k; 0 or 1 disables top-p).
        more_smooth: VAR's Gumbel-softmax smoothing of the codes (for visualisation, not FID).
        generator: one ``torch.Generator`` or a list with one per sample (a batch of N then equals N runs).
        cache: a cache policy with ``new_cache(model, batch, dtype=, device=)`` (default: the full cache).
        decode: decode the tokens to images (otherwise ``images`` is None).
    Returns:
        :class:`SampleOutput` with ``images [B, 3, H, W]`` in [0, 1], ``tokens`` (list of ``[B, pn, pn]``), stats.
    """
    t0 = time.perf_counter()
    cfg_model = model.config
    device = model.head.weight.device
    labels_B = as_label_tensor(labels_B, device)
    model.check_labels(labels_B)
    check_sampling_args(top_k, top_p, temperature)
    if not cfg >= 0:
        raise ConfigError(f"cfg must be >= 0 (VAR convention: 0 = no guidance), got {cfg}")
    if tuple(tok.patch_nums) != tuple(cfg_model.patch_nums) or tok.vocab_size != cfg_model.vocab_size:
        raise ConfigError(f"tokenizer (patch_nums {tok.patch_nums}, V {tok.vocab_size}) does not match the model "
                          f"(patch_nums {cfg_model.patch_nums}, V {cfg_model.vocab_size})")

    B, guided = labels_B.shape[0], cfg > 0
    patch_nums, num_scales = cfg_model.patch_nums, len(cfg_model.patch_nums)
    cond_BD = model.class_condition(labels_B)
    if guided:
        null = torch.full_like(labels_B, model.null_class)
        cond_BD = torch.cat((cond_BD, model.class_condition(null)))
    rows = cond_BD.shape[0]
    kv_cache = (cache or FullCache()).new_cache(model, rows, device=device)
    stats = SamplerStats()

    x_BlC = model.first_scale_input(cond_BD)
    f_hat = torch.zeros(B, tok.embed_dim, patch_nums[-1], patch_nums[-1], device=device)
    codebook = tok.quantize.embedding.weight
    tokens = []
    for si, pn in enumerate(patch_nums):
        ratio = si / (num_scales - 1) if num_scales > 1 else 1.0
        logits = model.forward_scale(x_BlC, cond_BD, kv_cache)  # [rows, pn*pn, V]
        stats.forward_passes += 1
        stats.track_kv(kv_cache)
        check_finite(logits, f"scale {si} (pn={pn})")
        if guided:
            logits = apply_cfg(logits[:B], logits[B:], 1 + cfg * ratio)
        logits = processed_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        idx_Bl = multinomial(logits.softmax(dim=-1), generator)
        tokens.append(idx_Bl.view(B, pn, pn))
        if more_smooth:
            tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
            h_BlC = gumbel_softmax(logits * (1 + ratio), tau, generator) @ codebook.float()
        else:
            h_BlC = codebook[idx_Bl]
        h_BChw = h_BlC.transpose(1, 2).reshape(B, -1, pn, pn).float()
        f_hat, next_BChw = tok.next_scale_input(si, f_hat, h_BChw)
        if si + 1 < num_scales:
            x_BlC = model.scale_input(si + 1, next_BChw.flatten(2).transpose(1, 2))
            if guided:
                x_BlC = torch.cat((x_BlC, x_BlC))
    stats.tokens = cfg_model.seq_len
    images = tok.latent_to_image(f_hat).add(1).mul(0.5) if decode else None
    stats.wall_time_s = time.perf_counter() - t0
    return SampleOutput(images=images, tokens=tokens, stats=stats)
