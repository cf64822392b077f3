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
from var.kernels._backend import disable_triton, requested_backend, resolve_backend


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
    if k_pool.dtype != k_cur.dtype or v_pool.dtype != v_cur.dtype:
        raise ConfigError(f"pool and current-scale dtypes must match (the cache stores new tokens in its pool dtype): "
                          f"k_pool {k_pool.dtype} vs k_cur {k_cur.dtype}, v_pool {v_pool.dtype} vs v_cur {v_cur.dtype}")


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
                  uniform_len: int | None = None, max_len: int | None = None):
    """Dense ``[B, H, P, D]`` copies (views when every head has the same length) of the ragged prefixes and the
    validity mask ``[B, H, P]`` (None when uniform), ``P = max(seg_len)``. ``max_len``: that maximum when the caller
    knows it on the host (saves a device read-back)."""
    D = k_pool_TD.shape[1]
    if uniform_len is not None:
        shape = (batch, heads, uniform_len, D)
        return k_pool_TD.view(shape), v_pool_TD.view(shape), None
    if max_len is None:
        max_len = int(seg_len.max()) if seg_len.numel() else 0
    ar = torch.arange(max_len, device=seg_len.device)
    valid = ar < seg_len[:, None]
    rows = torch.where(valid, seg_start[:, None].long() + ar, 0).view(-1)
    k = k_pool_TD.index_select(0, rows).view(batch, heads, max_len, D)
    v = v_pool_TD.index_select(0, rows).view(batch, heads, max_len, D)
    return k, v, valid.view(batch, heads, max_len)


def _ragged_attention_torch(q, k_pool, v_pool, seg_start, seg_len, k_cur, v_cur, *, scale, uniform_len, max_len):
    B, H, n, _ = q.shape
    if uniform_len == 0 or k_pool.shape[0] == 0:
        k_all, v_all, mask = k_cur, v_cur, None
    else:
        k_pre, v_pre, valid = gather_prefix(k_pool, v_pool, seg_start, seg_len, B, H, uniform_len=uniform_len,
                                            max_len=max_len)
        k_all, v_all = torch.cat((k_pre, k_cur), dim=2), torch.cat((v_pre, v_cur), dim=2)
        mask = None
        if valid is not None:
            mask = torch.cat((valid, valid.new_ones(B, H, n)), dim=2).unsqueeze(2)  # [B, H, 1, P + n]
    dtype = torch.promote_types(k_all.dtype, v_all.dtype)  # SDPA takes one dtype: the wider of K and V
    q = q.to(k_all.dtype).to(dtype)  # q rounded to K's dtype, as in the kernel
    out = F.scaled_dot_product_attention(q, k_all.to(dtype), v_all.to(dtype), attn_mask=mask, scale=scale)
    return out.to(v_cur.dtype)


def ragged_attention(q_BHnD, k_pool_TD, v_pool_TD, seg_start, seg_len, k_BHnD, v_BHnD, *, scale: float,
                     backend: str | None = None, out: torch.Tensor | None = None,
                     uniform_len: int | None = None, max_len: int | None = None) -> torch.Tensor:
    """Attention over (ragged prefix + dense current scale); see the module docstring for the layout.

    Dtypes: K/V are used in their stored dtypes (``k_pool``/``k_cur`` share one, ``v_pool``/``v_cur`` another,
    else :class:`~var.errors.ConfigError`); ``q`` is rounded to K's dtype (an fp32 query under autocast meets bf16
    pools as bf16), products accumulate in fp32 and the result has V's dtype. ``uniform_len`` is a hint that every
    head has exactly that many prefix rows laid out contiguously (the PyTorch path then avoids the gather); ``max_len``, ``max(seg_len)`` when the caller knows it on
the host (the PyTorch path then reads nothing back from the device; the Triton path never does). ``out``
    (any strides, V's dtype or another float dtype) is fully overwritten and returned.

    Backend: see :func:`var.kernels._backend.resolve_backend`. When the Triton kernel fails to compile or launch
    under ``auto``, this and every later call use the PyTorch path (one warning); an explicit ``triton`` raises.
    """
    _check(q_BHnD, k_pool_TD, v_pool_TD, seg_start, seg_len, k_BHnD, v_BHnD)
    if out is not None and out.shape != q_BHnD.shape:
        raise ConfigError(f"out must have q's shape {tuple(q_BHnD.shape)}, got {tuple(out.shape)}")
    if resolve_backend(backend, q_BHnD.device) == "triton":
        target = out if out is not None else torch.empty(q_BHnD.shape, dtype=v_BHnD.dtype, device=q_BHnD.device)
        try:
            from var.kernels._ragged_attention_triton import ragged_attention_triton

            return ragged_attention_triton(q_BHnD, k_pool_TD, v_pool_TD, seg_start.to(torch.int32),
                                           seg_len.to(torch.int32), k_BHnD, v_BHnD, scale=scale, out=target)
        except Exception as err:  # noqa: BLE001 - a compile/launch failure of an optional fast path
            if requested_backend(backend) == "triton":
                raise
            disable_triton(f"ragged_attention: {type(err).__name__}: {err}")
    result = _ragged_attention_torch(q_BHnD, k_pool_TD, v_pool_TD, seg_start, seg_len, k_BHnD, v_BHnD,
                                     scale=scale, uniform_len=uniform_len, max_len=max_len)
    if out is not None:
        out.copy_(result)
        return out
    return result
