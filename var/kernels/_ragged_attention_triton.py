"""Triton kernel of :func:`var.kernels.ragged_attention.ragged_attention` (imported lazily, never at package import).

One program per (query block, batch row x head). It streams two key sources with an online softmax
(FlashAttention-2 style, fp32 accumulators, ``exp2`` with the ``log2 e`` factor folded into the logit scale):

1. the head's compressed prefix: rows ``[seg_start[bh], seg_start[bh] + seg_len[bh])`` of the flat pools
   ``k_pool / v_pool [T, D]`` (a runtime trip count per head; zero-length heads skip the loop);
2. the current scale's dense keys ``k_cur / v_cur [B, H, n, D]``.

No mask: a VAR scale attends to every earlier token and to all of its own tokens.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _online_update(q, k, v, col_ok, m_i, l_i, acc, qk_scale, IEEE_K: tl.constexpr, IEEE_V: tl.constexpr,
                   DOT_FP32: tl.constexpr):
    k = k.to(q.dtype)
    if DOT_FP32:  # the CPU interpreter's bf16 tl.dot is wrong; compute the products in fp32 there
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    elif IEEE_K:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_FP32:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    elif IEEE_V:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def _ragged_attention_fwd(
        Q, KP, VP, KC, VC, O, SEG_START, SEG_LEN,
        n_cur, num_heads, qk_scale,
        sq_b, sq_h, sq_n, skp, svp, skc_b, skc_h, skc_n, svc_b, svc_h, svc_n, so_b, so_h, so_n,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE_K: tl.constexpr, IEEE_V: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < n_cur

    q_ptrs = Q + b.to(tl.int64) * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # source 1: the head's compressed prefix (ragged, possibly empty)
    seg_start = tl.load(SEG_START + bh).to(tl.int64)
    seg_len = tl.load(SEG_LEN + bh)
    for n0 in range(0, seg_len, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < seg_len
        rows = seg_start + cols
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(KP + rows[:, None] * skp + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(VP + rows[:, None] * svp + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_update(q, k, v, col_ok, m_i, l_i, acc, qk_scale, IEEE_K, IEEE_V, DOT_FP32)

    # source 2: the current scale's dense keys
    kc_base = KC + b.to(tl.int64) * skc_b + h * skc_h
    vc_base = VC + b.to(tl.int64) * svc_b + h * svc_h
    for n0 in range(0, n_cur, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < n_cur
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_base + cols[:, None] * skc_n + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(vc_base + cols[:, None] * svc_n + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_update(q, k, v, col_ok, m_i, l_i, acc, qk_scale, IEEE_K, IEEE_V, DOT_FP32)

    out = acc / l_i[:, None]
    o_ptrs = O + b.to(tl.int64) * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def ragged_attention_triton(q_BHnD, k_pool_TD, v_pool_TD, seg_start, seg_len, k_BHnD, v_BHnD, *, scale: float,
                            out: torch.Tensor) -> torch.Tensor:
    """Launch the kernel; ``out [B, H, n, D]`` is fully overwritten. Inputs are validated by the caller."""
    B, H, n, D = q_BHnD.shape
    if n == 0 or B * H == 0:
        return out
    on_gpu = q_BHnD.is_cuda
    block_d = max(16, triton.next_power_of_2(D))
    block_m = 64 if on_gpu else 16
    block_n = 64 if on_gpu else 16
    if k_pool_TD.shape[0] == 0:  # never dereferenced (all lengths 0) but needs a valid pointer
        k_pool_TD, v_pool_TD = k_BHnD.new_zeros(1, D), v_BHnD.new_zeros(1, D)
    interpreter_bf16 = not on_gpu and torch.bfloat16 in (q_BHnD.dtype, k_BHnD.dtype, v_BHnD.dtype)
    final = out
    if interpreter_bf16 and out.dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16 stores
        out = torch.empty(out.shape, dtype=torch.float32)
    grid = (triton.cdiv(n, block_m), B * H)
    _ragged_attention_fwd[grid](
        q_BHnD, k_pool_TD, v_pool_TD, k_BHnD, v_BHnD, out, seg_start, seg_len,
        n, H, scale * LOG2E,
        *q_BHnD.stride()[:3], k_pool_TD.stride(0), v_pool_TD.stride(0),
        *k_BHnD.stride()[:3], *v_BHnD.stride()[:3], *out.stride()[:3],
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        IEEE_K=q_BHnD.dtype == torch.float32, IEEE_V=v_BHnD.dtype == torch.float32,
        DOT_FP32=interpreter_bf16, num_warps=4 if D <= 64 else 8)
    if final is not out:
        final.copy_(out)
    return final
