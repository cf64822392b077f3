"""ZipAR (He et al., 2025): row-parallel next-token decoding driven by spatial locality (approximate).

Row ``i + 1`` starts as soon as row ``i`` has ``window`` (``s``) decoded tokens; every forward pass then advances
every active row by one token, so a ``H x W`` image takes about ``W + (H - 1) * s`` passes instead of ``H * W``.

Each pass feeds, per active row, its last decoded token at its own absolute position (non-contiguous positions in
one pass). The first token of row ``i`` is predicted from a placeholder: the latest decoded token of row ``i - 1``
written at the position of row ``i - 1``'s last column (the input that precedes ``(i, 0)`` in raster order); when
row ``i - 1`` is complete its true last token is fed at that position (output discarded) and the placeholder's
K/V is masked out from then on. K/V slots are kept in write order; the attention mask lets a query at position
``p`` see every live slot at a position ``<= p``, so tokens of the row above that are not decoded yet are never
attended (the released code leaves them as zeros, unmasked).

``window = W`` (the grid width) starts a row only when the row above is complete: that is exactly plain
next-token decoding (same forward passes, same draws: identical tokens for the same generator).
"""
from __future__ import annotations

import time

import torch

from var.errors import ConfigError
from var.samplers.logits import GeneratorArg, multinomial
from var.samplers.next_token import finish, prepare
from var.samplers.stats import SamplerStats


@torch.no_grad()
def sample_zipar(model, vq, labels_B, *, window: int | None = None, cfg: float = 2.0, top_k: int = 0,
                 top_p: float = 0.0, temperature: float = 1.0, generator: GeneratorArg = None, decode: bool = True):
    """Row-parallel decoding with a fixed window ``s`` (1 <= s <= grid width; default half the grid width, e.g. 8
    for LlamaGen's 16 x 16 grid; s = width is plain next-token decoding); see the module doc.

    Args as :func:`~var.samplers.next_token.sample_next_token`. ``stats.extra`` holds the window and the ideal
    step count ``W + (H - 1) * s``.
    """
    t0 = time.perf_counter()
    labels_B, proc, rows = prepare(model, vq, labels_B, cfg, temperature, top_k, top_p)
    H = W = model.config.grid_size
    window = max(1, W // 2) if window is None else window
    if not 1 <= window <= W:
        raise ConfigError(f"ZipAR window must be in [1, {W}] (the grid width), got {window}")
    B, N, T, device = len(labels_B), model.seq_len, model.prefix_len, labels_B.device
    cache = model.new_kv_cache(len(rows), capacity=T + N + H)
    stats = SamplerStats(peak_kv_cache_bytes=cache.nbytes())
    tokens = torch.zeros(B, N, dtype=torch.long, device=device)

    tokens[:, 0] = multinomial(proc.probs(model.prefill(rows, cache)[:, -1], "token 0"), generator)
    stats.forward_passes = 1
    slot_pos, slot_live = [0] * T, [True] * T   # absolute position and liveness of every K/V slot
    col = [0] * H                               # decoded tokens per row
    col[0] = 1
    placeholder = {}                            # row i -> slot of the placeholder that started it
    fed_last = [False] * H                      # the true last token of row i has been fed

    def pos_of(r: int, c: int) -> int:  # absolute position of the input token (r, c)
        return T + r * W + c

    while col[H - 1] < W:
        inputs, positions, predicts = [], [], []   # per input: token values [B], position, row it predicts
        for r in range(H):
            if 0 < col[r] < W:  # in progress: feed its latest token, predict the next one
                inputs.append(tokens[:, r * W + col[r] - 1])
                positions.append(pos_of(r, col[r] - 1))
                predicts.append(r)
            elif col[r] == W and r + 1 < H and not fed_last[r] and r + 1 in placeholder:
                inputs.append(tokens[:, r * W + W - 1])  # re-feed the true last token over the placeholder
                positions.append(pos_of(r, W - 1))
                predicts.append(None)
                slot_live[placeholder[r + 1]] = False
                fed_last[r] = True
        for r in range(1, H):
            if col[r] == 0 and col[r - 1] >= window:  # start row r from the latest token of the row above
                inputs.append(tokens[:, (r - 1) * W + col[r - 1] - 1])
                positions.append(pos_of(r - 1, W - 1))
                predicts.append(r)
                if col[r - 1] == W:
                    fed_last[r - 1] = True
                else:
                    placeholder[r] = len(slot_pos) + len(inputs) - 1
        l = len(inputs)
        slot_pos += positions
        slot_live += [True] * l
        key_pos = torch.tensor(slot_pos, device=device)
        live = torch.tensor(slot_live, device=device)
        query_pos = torch.tensor(positions, device=device)
        mask = live[None, :] & (key_pos[None, :] <= query_pos[:, None])  # [l, S + l]
        idx = torch.stack(inputs, dim=1)
        logits = model.decode(proc.double(idx), cache, positions=query_pos,
                              attn_mask=None if bool(mask.all()) else mask[None, None])
        stats.forward_passes += 1
        which = [j for j, r in enumerate(predicts) if r is not None]
        probs = proc.probs(logits[:, which], f"ZipAR pass {stats.forward_passes}")
        new = multinomial(probs, generator)  # [B, rows advanced]
        for k, j in enumerate(which):
            r = predicts[j]
            tokens[:, r * W + col[r]] = new[:, k]
            col[r] += 1

    stats.extra.update(window=window, ideal_steps=W + (H - 1) * window)
    return finish(model, vq, tokens, stats, t0, decode, cache=cache)
