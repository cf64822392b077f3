"""Attention of one scale's queries over a compressed, ragged per-head prefix plus the scale's own dense keys.

Layout (one layer)::

    k_pool, v_pool : [T, D]        kept tokens of all (batch row, head) pairs, head-major: pair bh = b*H + h owns
                                   rows [seg_start[bh], seg_start[bh] + seg_len[bh]) (lengths may be 0)
    seg_start/len  : [B*H] int32
    q, k_cur, v_cur: [B, H, n, D]  the current scale (queries already L2-normalised and scaled in VAR)
    out            : [B, H, n, D]  softmax(q k^T * scale) v over (prefix of the head) + (all n current keys)

Three implementations share the signature: :func:`ragged_attention_reference` (a per-head loop, the readable
definition; run it in float64 as the ground truth), the PyTorch path (one padded SDPA call) and the Triton kernel
(:mod:`var.kernels._ragged_attention_triton`). :func:`ragged_attention` dispatches between the last two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from var.errors import ConfigError
from var.kernels._backend import resolve_backend


def _check(q, k_pool, v_pool, seg_start, seg_len, k_cur, v_cur):
    if q.ndim != 4 or k_cur.shape != q.shape[:3] + k_cur.shape[3:] or v_cur.shape[:3] != q.shape[:3]:
        raise ConfigError(f"q/k_cur/v_cur must be [B, H, n, D] with equal B, H, n: "
                          f"{tuple(q.shape)}, {tuple(k_cur.shape)}, {tuple(v_cur.shape)}")
    B, H, n, D = q.shape
    if k_cur.shape[3] != D or v_cur.shape[3] != D or k_pool.shape[1:] != (D,) or v_pool.shape[1:] != (D,):
        raise ConfigError(f"head dims differ: q {D}, k_cur {k_cur.shape[3]}, v_cur {v_cur.shape[3]}, "
                          f"pools {tuple(k_pool.shape)}, {tuple(v_pool.shape)}")
    if seg_start.shape != (B * H,) or seg_len.shape != (B * H,):
        raise ConfigError(f"seg_start/seg_len must have B*H = {B * H} entries, got "
                          f"{tuple(seg_start.shape)}, {tuple(seg_len.shape)}")
    if k_pool.shape[0] != v_pool.shape[0]:
        raise ConfigError(f"k_pool has {k_pool.shape[0]} rows, v_pool {v_pool.shape[0]}")


def ragged_attention_reference(q_BHnD, k_pool_TD, v_pool_TD, seg_start, seg_len, k_BHnD, v_BHnD, *,
                               scale: float) -> torch.Tensor:
    """Readable definition: for each (b, h), softmax over the concatenation of its prefix and the current keys."""
    _check(q_BHnD, k_pool_TD, v_pool_TD, seg_start, seg_len, k_BHnD, v_BHnD)
    B, H, n, D = q_BHnD.shape
    out = torch.empty(B, H, n, D, dtype=q_BHnD.dtype, device=q_BHnD.device)
    for b in range(B):
        for h in range(H):
            s0, length = int(seg_start[b * H + h]), int(seg_len[b * H + h])
            keys = torch.cat((k_pool_TD[s0:s0 + length], k_BHnD[b, h])).to(q_BHnD.dtype)
            values = torch.cat((v_pool_TD[s0:s0 + length], v_BHnD[b, h])).to(q_BHnD.dtype)
            weights = torch.softmax(q_BHnD[b, h] @ keys.T * scale, dim=-1)
            out[b, h] = weights @ values
    return out


def gather_prefix(k_pool_TD, v_pool_TD, seg_start, seg_len, batch: int, heads: int, *,
                  uniform_len: int | None = None):
    """Dense ``[B, H, P, D]`` copies (views when every head has the same length) of the ragged prefixes and the
    validity mask ``[B, H, P]`` (None when uniform), ``P = max(seg_len)``."""
    D = k_pool_TD.shape[1]
    if uniform_len is not None:
        shape = (batch, heads, uniform_len, D)
        return k_pool_TD.view(shape), v_pool_TD.view(shape), None
    max_len = int(seg_len.max()) if seg_len.numel() else 0
    ar = torch.arange(max_len, device=seg_len.device)
    valid = ar < seg_len[:, None]
    rows = torch.where(valid, seg_start[:, None].long() + ar, 0).view(-1)
    k = k_pool_TD.index_select(0, rows).view(batch, heads, max_len, D)
    v = v_pool_TD.index_select(0, rows).view(batch, heads, max_len, D)
    return k, v, valid.view(batch, heads, max_len)


def _ragged_attention_torch(q, k_pool, v_pool, seg_start, seg_len, k_cur, v_cur, *, scale, uniform_len):
    B, H, n, _ = q.shape
    if uniform_len == 0 or k_pool.shape[0] == 0:
        k_all, v_all, mask = k_cur, v_cur, None
    else:
        k_pre, v_pre, valid = gather_prefix(k_pool, v_pool, seg_start, seg_len, B, H, uniform_len=uniform_len)
        k_all, v_all = torch.cat((k_pre, k_cur), dim=2), torch.cat((v_pre, v_cur), dim=2)
        mask = None
        if valid is not None:
            mask = torch.cat((valid, valid.new_ones(B, H, n)), dim=2).unsqueeze(2)  # [B, H, 1, P + n]
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=scale)


def ragged_attention(q_BHnD, k_pool_TD, v_pool_TD, seg_start, seg_len, k_BHnD, v_BHnD, *, scale: float,
                     backend: str | None = None, out: torch.Tensor | None = None,
                     uniform_len: int | None = None) -> torch.Tensor:
    """Attention over (ragged prefix + dense current scale); see the module docstring for the layout.

    Mixed dtypes follow :class:`~var.kernels.KVCache`: when K's dtype differs from q's (fp32 K under autocast),
    q, K and V are computed in fp32. ``uniform_len`` is a hint that every head has exactly that many prefix rows
    laid out contiguously (the PyTorch path then avoids the gather). ``out`` (Triton path) is fully overwritten.
    """
    _check(q_BHnD, k_pool_TD, v_pool_TD, seg_start, seg_len, k_BHnD, v_BHnD)
    if k_BHnD.dtype != q_BHnD.dtype or v_BHnD.dtype != q_BHnD.dtype:
        q_BHnD, k_BHnD, v_BHnD = q_BHnD.float(), k_BHnD.float(), v_BHnD.float()
        k_pool_TD, v_pool_TD = k_pool_TD.float(), v_pool_TD.float()
    if resolve_backend(backend, q_BHnD.device) == "torch":
        result = _ragged_attention_torch(q_BHnD, k_pool_TD, v_pool_TD, seg_start, seg_len, k_BHnD, v_BHnD,
                                         scale=scale, uniform_len=uniform_len)
        if out is not None:
            out.copy_(result)
            return out
        return result
    from var.kernels._ragged_attention_triton import ragged_attention_triton

    B, H, n, D = q_BHnD.shape
    if out is None:
        out = torch.empty(B, H, n, D, dtype=q_BHnD.dtype, device=q_BHnD.device)
    contiguous = [t if t.stride(-1) == 1 else t.contiguous() for t in (q_BHnD, k_pool_TD, v_pool_TD, k_BHnD, v_BHnD)]
    q_c, kp, vp, kc, vc = contiguous
    return ragged_attention_triton(q_c, kp, vp, seg_start.to(torch.int32).contiguous(),
                                   seg_len.to(torch.int32).contiguous(), kc, vc, scale=scale, out=out)
