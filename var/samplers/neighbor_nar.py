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
from var.models.nar import NAR
from var.samplers.logits import FiniteCheck, GeneratorArg, multinomial
from var.samplers.next_token import finish, prepare
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


@torch.no_grad()
def sample_nar(model, tokenizer, labels_B, *, cfg_scale: float = 2.0, top_k: int = 0, top_p: float = 0.0,
               temperature: float = 1.0, cfg_interval: int = -1, generator: GeneratorArg = None, cache=None,
               decode: bool = True, cfg: float | None = None) -> SampleOutput:
    """Sample ``len(labels_B)`` token grids with a :class:`~var.models.nar.NAR` model.

    Args:
        model: a :class:`~var.models.nar.NAR`; tokenizer: its single-scale tokenizer (None: no images).
        labels_B: class ids ``[B]`` in ``[0, num_classes]`` (``num_classes`` = unconditional).
        cfg_scale: LlamaGen guidance scale (1 = none; then the unconditional half is skipped); the paper uses
            2.0. ``cfg`` is its deprecated name.
        top_k, top_p, temperature: the shared logits filtering, per position (0 disables top-k / top-p).
        cfg_interval: the NAR release's rule: a diagonal is guided while at most ``cfg_interval`` tokens were
            generated before it (-1: always).
        generator: one ``torch.Generator`` or one per sample.
        cache: cache policy ``new_cache(model, batch, dtype=, device=)`` (default full).
    Returns:
        :class:`SampleOutput` with ``tokens [B, n*n]`` in raster order; ``stats.forward_passes == 2n - 1``.
    """
    t0 = time.perf_counter()
    if not isinstance(getattr(model, "_orig_mod", model), NAR):  # a plain GPT has no vertical head to sample from
        raise ConfigError(f"sampler nar drives a NAR as model, got {type(model).__name__}")
    labels_B, proc, rows_labels = prepare(model, tokenizer, labels_B, cfg_scale, temperature, top_k, top_p,
                                          cfg_interval, cfg=cfg)
    proc.finite = FiniteCheck()  # read back once, before the images are decoded
    device, n, B = labels_B.device, model.config.grid_size, labels_B.shape[0]
    kv_cache = (cache or FullCache()).new_cache(model, rows_labels.shape[0], device=device)
    stats = SamplerStats()

    grid = torch.zeros(B, n, n, dtype=torch.long, device=device)
    right, down = model.forward_heads(model.class_embed(rows_labels), torch.zeros(1, dtype=torch.long,
                                                                                  device=device), kv_cache)
    stats.forward_passes += 1
    grid[:, 0, 0] = multinomial(proc.probs((right + down) / 2, "diagonal 0"), generator, finite=proc.finite)[:, 0]
    for d in range(1, 2 * n - 1):
        rows = torch.tensor(list(diagonal_rows(d - 1, n)), device=device)
        cols = d - 1 - rows
        right, down = model.forward_heads(model.tok_embeddings(proc.double(grid[:, rows, cols])),
                                          1 + rows * n + cols, kv_cache)
        stats.forward_passes += 1
        stats.track_kv(kv_cache)
        tgt = torch.tensor(list(diagonal_rows(d, n)), device=device)
        generated = sum(len(diagonal_rows(e, n)) for e in range(d))
        guided = cfg_interval < 0 or generated <= cfg_interval  # NAR's count (LlamaGen's allows one more token)
        probs = proc.probs(_mixed_targets(right, down, d, n), f"diagonal {d}", guided)
        grid[:, tgt, d - tgt] = multinomial(probs, generator, finite=proc.finite)
    proc.finite.raise_if_failed()
    return finish(model, tokenizer, grid.flatten(1), stats, t0, decode)
