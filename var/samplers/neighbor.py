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

``schedule="released"`` follows the release (ThisisBillhe/ZipAR, ``generate_zipar.py``) pass for pass
(:func:`released_schedule`): row 0 is decoded completely first, a new row is seeded with the newest token of the row
two above (written at the slot of the row above's last cell), K/V slots are absolute positions, and a query at
position ``p`` attends every slot ``<= p``, undecoded cells included as zeros (24 x 24, s = 8: 224 passes; the
default schedule takes 208).
"""
from __future__ import annotations

import time

import torch

from var.errors import ConfigError
from var.samplers.logits import FiniteCheck, GeneratorArg, multinomial
from var.samplers.next_token import finish, prepare
from var.samplers.stats import SamplerStats


ZIPAR_SCHEDULES = ("eager", "released")


def released_schedule(H: int, W: int, window: int) -> list:
    """The release's passes after row 0, from its own bookkeeping (per-row counts that include a pending seed,
    rows started when the row above reaches ``window`` tokens). Each pass: ``(inputs, predicted)`` with inputs
    ``(source, cell_of_slot, row_or_None)``; ``source`` is the decoded cell fed, or ``("seed", cell)``."""
    count = [0] * H
    count[0] = W
    ongoing = [1]
    ids = [(0, c) for c in range(W)]  # the release's input_ids, as cells (a seed stays until its row's first token)
    completed_at, passes = None, []
    while len(ids) < H * W:
        inputs = []
        if completed_at is not None:  # feed the last token of the row completed last pass (output discarded)
            done = ongoing[0] - 1
            inputs.append((ids[completed_at], (done, count[done] - 1), None))
        for i, r in enumerate(ongoing):
            source = ids[sum(count[:r + 1]) - 1]
            if count[r] == 1 and count[ongoing[i - 1]] == window:  # the release's test for a seed-only row
                count[r] = 0
            inputs.append((source, divmod(r * W + count[r] - 1, W), r))
        skip, completed_at, finished, predicted = int(completed_at is not None), None, [], []
        for i in range(len(inputs) - skip):
            r = ongoing[i]
            at = sum(count[:r + 1])
            ids.insert(at, (r, count[r]))
            predicted.append((r, count[r]))
            count[r] += 1
            if r > 1 and count[r] == 1:
                ids.pop()  # drop the seed
            if count[r] == window and r < W - 1 and r + 1 not in ongoing:  # seed row r + 1 from row r - 1
                ids.append(("seed", ids[sum(count[:r]) - 1]))
                ongoing.append(r + 1)
                count[r + 1] += 1
            if count[r] == W:
                completed_at = at
                finished.append(r)
        for r in finished:
            ongoing.remove(r)
        passes.append((inputs, predicted))
    return passes


def _sample_released(model, proc, rows, cache, tokens, window, generator, stats):
    """Run :func:`released_schedule` with absolute K/V slots: each pass writes after the ``T + N`` slots, attends
    every slot at a position ``<= p`` (zeros where nothing was written, as the release) except those this pass
    rewrites, then moves its K/V to their slots."""
    H = W = model.config.grid_size
    T, N, device = model.prefix_len, model.seq_len, tokens.device
    for buf in cache.k + cache.v:
        buf.zero_()  # undecoded cells are attended as zeros
    first = model.prefill(rows, cache)
    tokens[:, 0] = multinomial(proc.probs(first[:, -1], "token 0"), generator, finite=proc.finite)
    cache.advance(N)  # slots [T, T + N) = the image positions; new K/V are written after them
    scratch = T + N

    def run_pass(cells, predict):
        positions = torch.tensor([T + r * W + c for r, c in cells], device=device)
        values = torch.stack([tokens[:, r * W + c] for r, c in [s[1] if s[0] == "seed" else s for s in predict]], 1)
        slot_pos = torch.arange(scratch, device=device)
        sees_slots = (slot_pos[None] <= positions[:, None]) & ~(slot_pos[None, :, None] == positions[None, None]).any(-1)
        sees_new = positions[None, :] <= positions[:, None]
        mask = torch.cat((sees_slots, sees_new), dim=1)[None, None]
        logits = model.decode(proc.double(values), cache, positions=positions, attn_mask=mask)
        stats.forward_passes += 1
        for buf in cache.k + cache.v:
            buf[:, :, positions] = buf[:, :, scratch:scratch + len(cells)].clone()
        cache.truncate(scratch)
        return logits

    for c in range(1, W):  # row 0, one token per pass
        logits = run_pass([(0, c - 1)], [(0, c - 1)])
        tokens[:, c] = multinomial(proc.probs(logits[:, -1], f"token {c}"), generator, finite=proc.finite)
    for inputs, predicted in released_schedule(H, W, window):
        logits = run_pass([slot for _, slot, _ in inputs], [source for source, _, _ in inputs])
        which = [j for j, (_, _, r) in enumerate(inputs) if r is not None][:len(predicted)]
        new = multinomial(proc.probs(logits[:, which], f"ZipAR pass {stats.forward_passes}"), generator,
                          finite=proc.finite)
        for k, (r, c) in enumerate(predicted):
            tokens[:, r * W + c] = new[:, k]


@torch.no_grad()
def sample_zipar(model, tokenizer, labels_B, *, window: int | None = None, schedule: str = "eager",
                 cfg_scale: float = 2.0, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
                 generator: GeneratorArg = None, decode: bool = True, cfg: float | None = None):
    """Row-parallel decoding with a fixed window ``s`` (1 <= s <= grid width; default half the grid width, e.g. 8
    for LlamaGen's 16 x 16 grid; s = width is plain next-token decoding); see the module doc.

    ``schedule="released"``: the release's passes (see the module doc; its default window is 8 at any size).
    Args as :func:`~var.samplers.next_token.sample_next_token`. ``stats.extra`` holds the window and the ideal
    step count ``W + (H - 1) * s``.
    """
    if schedule not in ZIPAR_SCHEDULES:
        raise ConfigError(f"ZipAR schedule must be one of {ZIPAR_SCHEDULES}, got {schedule!r}")
    t0 = time.perf_counter()
    labels_B, proc, rows = prepare(model, tokenizer, labels_B, cfg_scale, temperature, top_k, top_p, cfg=cfg)
    proc.finite = FiniteCheck()  # read back once, before the images are decoded
    H = W = model.config.grid_size
    if window is None:
        window = min(8, W) if schedule == "released" else max(1, W // 2)
    if not 1 <= window <= W:
        raise ConfigError(f"ZipAR window must be in [1, {W}] (the grid width), got {window}")
    B, N, T, device = len(labels_B), model.seq_len, model.prefix_len, labels_B.device
    cache = model.new_kv_cache(len(rows), capacity=T + N + H + 1)
    stats = SamplerStats(peak_kv_cache_bytes=cache.nbytes())
    tokens = torch.zeros(B, N, dtype=torch.long, device=device)
    if schedule == "released":
        stats.forward_passes = 1
        _sample_released(model, proc, rows, cache, tokens, window, generator, stats)
        stats.extra.update(window=window, schedule=schedule)
        proc.finite.raise_if_failed()
        return finish(model, tokenizer, tokens, stats, t0, decode, cache=cache)

    tokens[:, 0] = multinomial(proc.probs(model.prefill(rows, cache)[:, -1], "token 0"), generator, finite=proc.finite)
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
        new = multinomial(probs, generator, finite=proc.finite)  # [B, rows advanced]
        for k, j in enumerate(which):
            r = predicts[j]
            tokens[:, r * W + col[r]] = new[:, k]
            col[r] += 1

    stats.extra.update(window=window, schedule=schedule, ideal_steps=W + (H - 1) * window)
    proc.finite.raise_if_failed()
    return finish(model, tokenizer, tokens, stats, t0, decode, cache=cache)
