"""CTF's two-stage sampler: raster AR over coarse labels (N passes), then all fine codes in one pass (N + 1 total).

Stage 1 is the plain cached next-token loop of a :class:`~var.models.gpt.GPT` over the K coarse labels (LlamaGen
guidance ``uncond + s * (cond - uncond)``, temperature ``tau1``, top-k/top-p). Stage 2 runs
:class:`~var.models.ctf.CTFStage2` once on the whole coarse sequence and samples every position independently
(temperature ``tau2``, top-k; the paper's default is no top-k). With ``constrained=True`` (default) each position
may only take a code of its coarse cluster, so the fine map always refines the coarse one.
"""
from __future__ import annotations

import time

import torch

from var.errors import ConfigError
from var.kernels.kv_cache import FullCache
from var.models.ctf import cluster_members, constrain_logits
from var.samplers.logits import (GeneratorArg, apply_cfg, check_finite, check_sampling_args, multinomial,
                                 processed_logits)
from var.samplers.next_scale import as_label_tensor
from var.samplers.stats import SampleOutput, SamplerStats


def _guide(logits, B, guided, scale):
    return apply_cfg(logits[:B], logits[B:], scale) if guided else logits


def _check_pair(stage1, stage2, cluster_of_V) -> None:
    c1, c2 = stage1.config, stage2.config
    if c1.vocab_size != c2.num_coarse or c1.grid_size != c2.grid_size or c1.num_classes != c2.num_classes:
        raise ConfigError(f"stage 1 (K={c1.vocab_size}, grid {c1.grid_size}, {c1.num_classes} classes) and stage 2 "
                          f"(K={c2.num_coarse}, grid {c2.grid_size}, {c2.num_classes} classes) do not match")
    if cluster_of_V.shape != (c2.vocab_size,) or cluster_of_V.min() < 0 or cluster_of_V.max() >= c2.num_coarse:
        raise ConfigError(f"cluster_of must map {c2.vocab_size} codes to labels in [0, {c2.num_coarse})")


@torch.no_grad()
def sample_coarse_labels(stage1, labels_B, *, cfg_scale: float = 2.0, top_k: int = 0, top_p: float = 1.0,
                         temperature: float = 1.0, generator: GeneratorArg = None, cache=None,
                         stats: SamplerStats | None = None) -> torch.Tensor:
    """Stage 1: raster next-token sampling of ``[B, grid^2]`` coarse labels (one pass per token)."""
    device = stage1.output.weight.device
    B, N, guided = labels_B.shape[0], stage1.seq_len, cfg_scale != 1.0
    rows_labels = torch.cat((labels_B, torch.full_like(labels_B, stage1.null_class))) if guided else labels_B
    kv_cache = (cache or FullCache()).new_cache(stage1, rows_labels.shape[0], device=device)
    out = torch.empty(B, N, dtype=torch.long, device=device)
    logits = stage1.prefill(rows_labels, kv_cache)
    for i in range(N):
        if i > 0:
            prev = out[:, i - 1:i]
            logits = stage1.decode(torch.cat((prev, prev)) if guided else prev, kv_cache)
        check_finite(logits, f"stage 1 token {i}")
        if stats is not None:
            stats.forward_passes += 1
            stats.peak_kv_cache_bytes = max(stats.peak_kv_cache_bytes, kv_cache.nbytes())
        logits = processed_logits(_guide(logits[:, -1], B, guided, cfg_scale), temperature=temperature,
                                  top_k=top_k, top_p=top_p)
        out[:, i] = multinomial(logits.softmax(-1), generator)
    return out


@torch.no_grad()
def sample_fine(stage2, labels_B, coarse_BN, cluster_of_V, *, cfg_scale: float = 1.0, top_k: int = 0,
                temperature: float = 1.0, constrained: bool = True, generator: GeneratorArg = None) -> torch.Tensor:
    """Stage 2: all fine codes ``[B, grid^2]`` from the coarse labels in one forward pass."""
    B, guided = labels_B.shape[0], cfg_scale != 1.0
    if guided:
        logits = stage2(torch.cat((labels_B, torch.full_like(labels_B, stage2.null_class))),
                        torch.cat((coarse_BN, coarse_BN)))
    else:
        logits = stage2(labels_B, coarse_BN)
    check_finite(logits, "stage 2")
    logits = _guide(logits, B, guided, cfg_scale)
    if constrained:
        logits = constrain_logits(logits, coarse_BN, cluster_members(cluster_of_V, stage2.config.num_coarse))
    logits = processed_logits(logits, temperature=temperature, top_k=top_k)
    return multinomial(logits.softmax(-1), generator)


@torch.no_grad()
def sample_coarse_to_fine(stage1, stage2, cluster_of_V, labels_B, *, cfg_scale: float = 2.0, top_k: int = 0,
                          top_p: float = 1.0, temperature: float = 1.1, stage2_cfg_scale: float = 1.0,
                          stage2_top_k: int = 0, stage2_temperature: float = 1.1, constrained: bool = True,
                          generator: GeneratorArg = None, cache=None, tok=None) -> SampleOutput:
    """Sample ``len(labels_B)`` token grids with CTF (defaults: the paper's tau1 = tau2 = 1.1, no stage-2 top-k).

    Args:
        stage1: GPT over the K coarse labels; stage2: :class:`~var.models.ctf.CTFStage2`.
        cluster_of_V: coarse label of every code ``[V]`` (:func:`~var.models.ctf.kmeans_codebook`).
        cfg_scale / stage2_cfg_scale: LlamaGen guidance per stage (1 = none).
        constrained: restrict each fine code to its coarse cluster.
        tok: a single-scale tokenizer to decode with (``images`` is None without one).
    Returns:
        :class:`SampleOutput` with fine ``tokens [B, grid^2]``; ``stats.extra["coarse"]`` holds the coarse labels.
    """
    t0 = time.perf_counter()
    device = stage1.output.weight.device
    labels_B = as_label_tensor(labels_B, device)
    stage1.check_labels(labels_B)
    cluster_of_V = cluster_of_V.to(device)
    _check_pair(stage1, stage2, cluster_of_V)
    check_sampling_args(top_k, top_p, temperature)
    check_sampling_args(stage2_top_k, 0.0, stage2_temperature)
    if not (cfg_scale >= 0 and stage2_cfg_scale >= 0):
        raise ConfigError(f"guidance scales must be >= 0 (1 = none), got {cfg_scale}, {stage2_cfg_scale}")
    stats = SamplerStats()
    coarse = sample_coarse_labels(stage1, labels_B, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p,
                                  temperature=temperature, generator=generator, cache=cache, stats=stats)
    fine = sample_fine(stage2, labels_B, coarse, cluster_of_V, cfg_scale=stage2_cfg_scale, top_k=stage2_top_k,
                       temperature=stage2_temperature, constrained=constrained, generator=generator)
    stats.forward_passes += 1
    stats.tokens = stage1.seq_len
    stats.extra["coarse"] = coarse
    images = tok.decode([fine]).add(1).mul(0.5) if tok is not None else None
    stats.wall_time_s = time.perf_counter() - t0
    return SampleOutput(images=images, tokens=fine, stats=stats)
