"""NAR's neighbouring sampler: one prefill, then one forward pass per anti-diagonal (2n - 1 passes for n x n).

Pass ``d`` (1 .. 2n-2) feeds the tokens of anti-diagonal ``d - 1`` (row ascending) at their raster positions; the
cache holds every earlier diagonal, so with no mask each new token sees exactly the tokens at distance ``<= d - 1``,
which is what the proximity mask gives it in training. Target ``(i, j)`` on diagonal ``d`` averages the horizontal
head of ``(i, j - 1)`` and the vertical head of ``(i - 1, j)`` (whichever exist); the first token averages both
heads at the class token. Guidance is LlamaGen's ``uncond + s * (cond - uncond)`` on the mixed logits.
"""
from __future__ import annotations

import time

import torch

from var.errors import ConfigError
from var.kernels.kv_cache import FullCache
from var.samplers.logits import (GeneratorArg, apply_cfg, check_finite, check_sampling_args, multinomial,
                                 processed_logits)
from var.samplers.next_scale import as_label_tensor
from var.samplers.stats import SampleOutput, SamplerStats


def diagonal_rows(d: int, n: int) -> range:
    """Rows of the cells on anti-diagonal ``d`` of an ``n x n`` grid (column = d - row), ascending."""
    return range(max(0, d - n + 1), min(d, n - 1) + 1)


def _mixed_targets(right, down, d: int, n: int):
    """Logits of diagonal ``d``'s cells from the heads over diagonal ``d - 1``'s inputs: ``[rows, m_d, V]``."""
    first_in = diagonal_rows(d - 1, n).start
    out = []
    for i in diagonal_rows(d, n):
        j = d - i
        parts = []
        if j > 0:
            parts.append(right[:, i - first_in])       # right of (i, j - 1)
        if i > 0:
            parts.append(down[:, i - 1 - first_in])    # below (i - 1, j)
        out.append(sum(parts) / len(parts))
    return torch.stack(out, dim=1)


def _sample(logits, B, guided, cfg_scale, temperature, top_k, top_p, generator, where):
    check_finite(logits, where)
    if guided:
        logits = apply_cfg(logits[:B], logits[B:], cfg_scale)
    logits = processed_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return multinomial(logits.softmax(dim=-1), generator)


@torch.no_grad()
def sample_nar(model, labels_B, *, cfg_scale: float = 2.0, top_k: int = 0, top_p: float = 1.0,
               temperature: float = 1.0, generator: GeneratorArg = None, cache=None, tok=None) -> SampleOutput:
    """Sample ``len(labels_B)`` token grids with a :class:`~var.models.nar.NAR` model.

    Args:
        cfg_scale: LlamaGen guidance ``s`` (1 = none; then the unconditional half is skipped).
        top_k, top_p, temperature: logits filtering per position (0 / 1 disable top-k / top-p).
        generator: one ``torch.Generator`` or one per sample.
        cache: cache policy ``new_cache(model, batch, dtype=, device=)`` (default full).
        tok: a single-scale tokenizer to decode with (``images`` is None without one).
    Returns:
        :class:`SampleOutput` with ``tokens [B, n*n]`` in raster order; ``stats.forward_passes == 2n - 1``.
    """
    t0 = time.perf_counter()
    device = model.output.weight.device
    labels_B = as_label_tensor(labels_B, device)
    model.check_labels(labels_B)
    check_sampling_args(top_k, top_p, temperature)
    if not cfg_scale >= 0:
        raise ConfigError(f"cfg_scale must be >= 0 (1 = no guidance), got {cfg_scale}")
    n, B, guided = model.config.grid_size, labels_B.shape[0], cfg_scale != 1.0
    rows_labels = torch.cat((labels_B, torch.full_like(labels_B, model.null_class))) if guided else labels_B
    kv_cache = (cache or FullCache()).new_cache(model, rows_labels.shape[0], device=device)
    stats = SamplerStats()
    knobs = dict(B=B, guided=guided, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                 generator=generator)

    grid = torch.zeros(B, n, n, dtype=torch.long, device=device)
    right, down = model.forward_heads(model.class_embed(rows_labels), torch.zeros(1, dtype=torch.long,
                                                                                  device=device), kv_cache)
    stats.forward_passes += 1
    grid[:, 0, 0] = _sample((right + down) / 2, where="diagonal 0", **knobs)[:, 0]
    for d in range(1, 2 * n - 1):
        rows = torch.tensor(list(diagonal_rows(d - 1, n)), device=device)
        cols = d - 1 - rows
        idx_Bm = grid[:, rows, cols]
        if guided:
            idx_Bm = torch.cat((idx_Bm, idx_Bm))
        right, down = model.forward_heads(model.tok_embeddings(idx_Bm), 1 + rows * n + cols, kv_cache)
        stats.forward_passes += 1
        stats.peak_kv_cache_bytes = max(stats.peak_kv_cache_bytes, kv_cache.nbytes())
        tgt_rows = torch.tensor(list(diagonal_rows(d, n)), device=device)
        grid[:, tgt_rows, d - tgt_rows] = _sample(_mixed_targets(right, down, d, n), where=f"diagonal {d}", **knobs)
    stats.tokens = n * n
    images = tok.decode([grid]).add(1).mul(0.5) if tok is not None else None
    stats.wall_time_s = time.perf_counter() - t0
    return SampleOutput(images=images, tokens=grid.flatten(1), stats=stats)
