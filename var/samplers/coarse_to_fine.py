"""CTF's two-stage sampler: raster AR over coarse labels (N passes), then all fine codes in one pass (N + 1 total).

Stage 1 is the plain cached next-token loop of a :class:`~var.models.gpt.GPT` over the K coarse labels (LlamaGen
guidance ``uncond + s * (cond - uncond)``, temperature ``tau1``, top-k/top-p). Stage 2 runs
:class:`~var.models.ctf.CTFStage2` once on the whole coarse sequence and samples every position independently
(temperature ``tau2``, top-k; the paper's default is no top-k). With ``constrained=True`` (default) each position
may only take a code of its coarse cluster, so the fine map always refines the coarse one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from var.errors import ConfigError
from var.kernels.kv_cache import FullCache
from var.samplers.logits import (FiniteCheck, GeneratorArg, apply_cfg, check_finite, constrain_logits,
                                 multinomial, processed_logits)
from var.samplers.next_token import TokenProcessor, finish, legacy_cfg_scale, prepare
from var.samplers.stats import SampleOutput, SamplerStats


@dataclass
class CTFSampleOutput(SampleOutput):
    """:class:`SampleOutput` plus the stage-1 ``coarse`` labels ``[B, grid^2]`` (kept out of ``stats`` so that the
    stats stay JSON-serialisable)."""

    coarse: torch.Tensor | None = None


def _check_pair(stage1, stage2, tokenizer) -> None:
    c1, c2 = stage1.config, stage2.config
    if c1.vocab_size != c2.num_coarse or c1.grid_size != c2.grid_size or c1.num_classes != c2.num_classes:
        raise ConfigError(f"stage 1 (K={c1.vocab_size}, grid {c1.grid_size}, {c1.num_classes} classes) and stage 2 "
                          f"(K={c2.num_coarse}, grid {c2.grid_size}, {c2.num_classes} classes) do not match")
    if tokenizer is not None and tokenizer.vocab_size != c2.vocab_size:
        raise ConfigError(f"tokenizer (V {tokenizer.vocab_size}) does not match stage 2 (V {c2.vocab_size})")


def draw_coarse_labels(stage1, labels_B, proc: TokenProcessor, *, generator: GeneratorArg = None, cache=None,
                       stats: SamplerStats | None = None) -> torch.Tensor:
    """Stage 1: raster next-token sampling of ``[B, grid^2]`` coarse labels (one pass per token)."""
    B, N = labels_B.shape[0], stage1.seq_len
    rows = stage1.condition_rows(labels_B, proc.guided)
    kv_cache = (cache or FullCache()).new_cache(stage1, rows.shape[0], device=labels_B.device)
    out = torch.empty(B, N, dtype=torch.long, device=labels_B.device)
    logits = stage1.prefill(rows, kv_cache)
    for i in range(N):
        if i > 0:
            logits = stage1.decode(proc.double(out[:, i - 1:i]), kv_cache)
        if stats is not None:
            stats.forward_passes += 1
            stats.track_kv(kv_cache)
        out[:, i] = multinomial(proc.probs(logits[:, -1], f"stage 1 token {i}"), generator, finite=proc.finite)
    return out


def draw_fine(stage2, labels_B, coarse_BN, proc: TokenProcessor, *, constrained: bool = True,
              generator: GeneratorArg = None) -> torch.Tensor:
    """Stage 2: all fine codes ``[B, grid^2]`` from the coarse labels in one forward pass.

    Order: guidance on the raw logits, then the cluster constraint (-inf outside the cluster), then temperature and
    top-k/top-p (which never revive a masked code).
    """
    logits = stage2(stage2.condition_rows(labels_B, proc.guided), proc.double(coarse_BN))
    check_finite(logits, "stage 2")
    if proc.guided:
        B = labels_B.shape[0]
        logits = apply_cfg(logits[:B], logits[B:], proc.cfg_scale)
    if constrained:
        logits = constrain_logits(logits, coarse_BN, stage2.members())
    probs = processed_logits(logits, temperature=proc.temperature, top_k=proc.top_k, top_p=proc.top_p).softmax(-1)
    return multinomial(probs, generator)


@torch.no_grad()
def sample_coarse_to_fine(stage1, stage2, tokenizer, labels_B, *, cfg_scale: float = 2.0, top_k: int = 0,
                          top_p: float = 0.0, temperature: float = 1.1, stage2_cfg_scale: float = 1.0,
                          stage2_top_k: int = 0, stage2_temperature: float = 1.1, constrained: bool = True,
                          generator: GeneratorArg = None, cache=None, decode: bool = True, cfg: float | None = None,
                          stage2_cfg: float | None = None) -> CTFSampleOutput:
    """Sample ``len(labels_B)`` token grids with CTF (defaults: the paper's tau1 = tau2 = 1.1, no stage-2 top-k).

    Args:
        stage1: GPT over the K coarse labels; stage2: :class:`~var.models.ctf.CTFStage2` (holds ``cluster_of``).
        tokenizer: the single-scale tokenizer of the fine codes (None: no images).
        cfg_scale / stage2_cfg_scale: LlamaGen guidance per stage (1 = none; ``cfg`` / ``stage2_cfg`` are their
            deprecated names); top_k / top_p / temperature: stage 1.
        stage2_top_k / stage2_temperature: stage 2 (no top-p, as in the paper).
        constrained: restrict each fine code to its coarse cluster.
        cache: cache policy for stage 1 (stage 2 has no cache).
    Returns:
        :class:`CTFSampleOutput` with fine ``tokens [B, grid^2]`` and the ``coarse`` labels;
        ``stats.forward_passes == grid^2 + 1``.
    """
    t0 = time.perf_counter()
    _check_pair(stage1, stage2, tokenizer)
    labels_B, proc1, _ = prepare(stage1, None, labels_B, cfg_scale, temperature, top_k, top_p, cfg=cfg)
    proc1.finite = FiniteCheck()  # stage 1 reads back once, after its token loop
    proc2 = TokenProcessor(labels_B.shape[0], legacy_cfg_scale(stage2_cfg_scale, stage2_cfg), stage2_temperature,
                           stage2_top_k, 0.0)
    stats = SamplerStats()
    coarse = draw_coarse_labels(stage1, labels_B, proc1, generator=generator, cache=cache, stats=stats)
    proc1.finite.raise_if_failed()
    fine = draw_fine(stage2, labels_B, coarse, proc2, constrained=constrained, generator=generator)
    stats.forward_passes += 1
    out = finish(stage1, tokenizer, fine, stats, t0, decode)
    return CTFSampleOutput(images=out.images, tokens=out.tokens, stats=out.stats, coarse=coarse)
