"""Compaction of a ragged per-head cache: gather the kept tokens of (old prefix + current scale) into a new pool.

Candidates of one layer are indexed ``[B, H, P]`` with ``P = max_prefix + n``: position ``p < max_prefix`` is
prefix row ``p`` of the head (valid when ``p < seg_len``), position ``max_prefix + i`` is token ``i`` of the
current scale. A boolean ``keep [B, H, P]`` selects survivors; the new pool is head-major and keeps each head's
tokens in candidate order (scale-major raster order), so segments stay contiguous and sorted.
"""
from __future__ import annotations

import torch


def kept_rows(keep_BHP: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor, max_prefix: int,
              pool_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Source rows of the survivors in the virtual concatenation ``[pool rows ; current tokens (b, h, i)]``.

    Returns ``rows [T_new]`` (long), ``new_len [B*H]`` (int32), ``cand [T_new]`` (each survivor's candidate position,
    for carrying per-token metadata along) and ``(min, max)`` of ``new_len`` on the host. The new pool's size is
    data-dependent, so one device read-back is unavoidable: it fetches the total and the min/max lengths together
    (one synchronisation per compaction), and the survivors are then placed by a prefix sum instead of ``nonzero``.
    """
    B, H, P = keep_BHP.shape
    n_cur = P - max_prefix
    device = keep_BHP.device
    prefix_ok = torch.arange(P, device=device) < max_prefix
    valid_prefix = torch.arange(max_prefix, device=device) < seg_len.view(B, H, 1)
    keep = (keep_BHP & torch.cat((valid_prefix, valid_prefix.new_ones(B, H, n_cur)), dim=2)).view(-1)
    new_len = keep.view(B * H, P).sum(dim=1, dtype=torch.int32)
    if new_len.numel():
        total, lo, hi = torch.stack((new_len.sum(), new_len.min(), new_len.max())).tolist()
    else:
        total, lo, hi = 0, 0, 0
    # a permutation putting the survivors first in row-major candidate order (the order nonzero lists them): the
    # j-th survivor goes to slot j, the other candidates after slot ``total`` in their order (unique targets)
    index = torch.arange(keep.numel(), device=device)
    kept_before = keep.cumsum(0) - keep.long()
    slot = torch.where(keep, kept_before, total + index - kept_before)
    flat = torch.empty_like(slot).scatter_(0, slot, index)[:total]
    bh, cand = flat // P, flat % P
    in_prefix = prefix_ok[cand]
    rows = torch.where(in_prefix, seg_start.long()[bh] + cand,
                       pool_rows + bh * n_cur + (cand - max_prefix))
    return rows, new_len, cand, (lo, hi)


def gather_rows(pool_TD: torch.Tensor, cur_BHnD: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[len(rows), D]`` rows taken from ``pool`` (row < T) or from the flattened current tokens (row >= T)."""
    T = pool_TD.shape[0]
    cur_flat = cur_BHnD.reshape(-1, *cur_BHnD.shape[3:]).to(pool_TD.dtype)
    if T == 0:
        return cur_flat.index_select(0, rows)
    if cur_flat.shape[0] == 0:
        return pool_TD.index_select(0, rows)
    from_pool = (rows < T).view(-1, *([1] * (pool_TD.ndim - 1)))
    return torch.where(from_pool, pool_TD.index_select(0, rows.clamp(max=T - 1)),
                       cur_flat.index_select(0, (rows - T).clamp(min=0)))


def segment_starts(lengths: torch.Tensor) -> torch.Tensor:
    """Exclusive cumulative sum: where each head's segment starts in a head-major pool."""
    return (torch.cumsum(lengths, 0) - lengths).to(torch.int32)
