"""Triton kernel of :func:`var.kernels.ragged_attention.ragged_attention` (imported lazily, never at package import).

One program per (batch row x head, query block), flattened into one grid axis (so ``B*H`` can exceed CUDA's
65,535 limit of the second axis). It streams two key sources with an online softmax (FlashAttention-2 style, fp32
accumulators, ``exp2`` with the ``log2 e`` factor folded into the logit scale):

1. the head's compressed prefix: rows ``[seg_start[bh], seg_start[bh] + seg_len[bh])`` of the flat pools
   ``k_pool / v_pool [T, D]`` (a runtime trip count per head; zero-length heads skip the loop);
2. the current scale's dense keys ``k_cur / v_cur [B, H, n, D]``.

No mask: a VAR scale attends to every earlier token and to all of its own tokens.

Precision: K and V are read in their stored dtype (no upcast copy of a pool); ``q`` is rounded to K's dtype and the
softmax weights to V's dtype in registers, so bf16/fp16 pools use tensor-core ``tl.dot`` with fp32 accumulation and
fp32 pools use IEEE fp32 products (no TF32). Every tensor is addressed through all its strides, so any view works.

Block sizes: compiled on CUDA, an autotuner picks among a few configurations per (head dim, query-length bucket,
prefix-length bucket, dtypes), after dropping those whose pipelined K/V tiles would not fit in shared memory. The
CPU interpreter (``TRITON_INTERPRET=1``, tests) uses one small fixed configuration.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from var.kernels._backend import triton_interpreted

LOG2E = 1.4426950408889634
SMEM_BUDGET = 96 * 1024  # bytes per program: fits every GPU since sm_80 (A10/L4 have 99 KB, A100 163 KB, H100 227 KB)
INTERPRETER_BLOCKS = (16, 16)  # (BLOCK_M, BLOCK_N) on the CPU interpreter: small, so the tests stay fast
# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M 16 keeps small early scales (1..16 queries) from idling
# (few: each is compiled per head-dim block and dtype, which the GPU test tier's time budget pays for)
CANDIDATES = ((16, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (64, 32, 4, 1), (16, 16, 4, 1))


@triton.jit
def _online_update(q, k, v, col_ok, m_i, l_i, acc, qk_scale, EMULATE_DOT: tl.constexpr):
    # q [M, D] (K's dtype), k/v [N, D] stored dtypes; s and the accumulators are fp32
    if EMULATE_DOT:  # CPU interpreter: its bf16 tl.dot is wrong; same rounded inputs, products in fp32
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    elif k.dtype == tl.float32:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p_v = p.to(v.dtype)  # the weights enter P.V in V's dtype (tensor cores for bf16/fp16)
    if EMULATE_DOT:
        pv = tl.dot(p_v.to(tl.float32), v.to(tl.float32), input_precision="ieee")
    elif v.dtype == tl.float32:
        pv = tl.dot(p_v, v, input_precision="ieee")
    else:
        pv = tl.dot(p_v, v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


# lengths and bucket keys vary per scale: no specialisation on them (one compile serves every scale)
@triton.jit(do_not_specialize=["n_cur", "num_heads", "N_BUCKET", "P_BUCKET"])
def _ragged_attention_fwd(
        Q, KP, VP, KC, VC, O, SEG_START, SEG_LEN,
        n_cur, num_heads, qk_scale,
        sq_b, sq_h, sq_n, sq_d, skp_t, skp_d, svp_t, svp_d,
        skc_b, skc_h, skc_n, skc_d, svc_b, svc_h, svc_n, svc_d, so_b, so_h, so_n, so_d,
        N_BUCKET, P_BUCKET,  # autotuning keys only (query / mean prefix length, rounded up to a power of 2)
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        EMULATE_DOT: tl.constexpr):
    num_m = tl.cdiv(n_cur, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m  # query blocks of one head are adjacent in launch order: they share its K/V in L2
    pid_m = pid % num_m
    b = bh // num_heads
    h = bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < n_cur

    q_ptrs = Q + b.to(tl.int64) * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(KP.dtype.element_ty)
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
        k = tl.load(KP + rows[:, None] * skp_t + offs_d[None, :] * skp_d, mask=kv_mask, other=0.0)
        v = tl.load(VP + rows[:, None] * svp_t + offs_d[None, :] * svp_d, mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_update(q, k, v, col_ok, m_i, l_i, acc, qk_scale, EMULATE_DOT)

    # source 2: the current scale's dense keys
    kc_base = KC + b.to(tl.int64) * skc_b + h * skc_h
    vc_base = VC + b.to(tl.int64) * svc_b + h * svc_h
    for n0 in range(0, n_cur, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < n_cur
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(kc_base + cols[:, None] * skc_n + offs_d[None, :] * skc_d, mask=kv_mask, other=0.0)
        v = tl.load(vc_base + cols[:, None] * svc_n + offs_d[None, :] * svc_d, mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_update(q, k, v, col_ok, m_i, l_i, acc, qk_scale, EMULATE_DOT)

    out = acc / l_i[:, None]
    o_ptrs = O + b.to(tl.int64) * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :] * so_d
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def shared_memory_bytes(block_m: int, block_n: int, block_d: int, num_stages: int, k_bytes: int,
                        v_bytes: int) -> int:
    """Upper estimate of one program's shared memory: ``num_stages`` pipelined K and V tiles, the q tile (in K's
    dtype) and the softmax weights staged as a ``tl.dot`` operand. (Triton's own figure for sm_90 is lower:
    e.g. 64 KB for fp32 at head dim 128, BLOCK 64x32, 1 stage, estimated here at 72 KB.)"""
    kv_tiles = num_stages * block_n * block_d * (k_bytes + v_bytes)
    return kv_tiles + block_m * block_d * k_bytes + block_m * block_n * v_bytes


def configs_that_fit(block_d: int, k_bytes: int, v_bytes: int) -> list[tuple[int, int, int, int]]:
    """The candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) whose shared memory fits :data:`SMEM_BUDGET`."""
    fit = [c for c in CANDIDATES if shared_memory_bytes(c[0], c[1], block_d, c[3], k_bytes, v_bytes) <= SMEM_BUDGET]
    return fit or [CANDIDATES[-1]]


@functools.lru_cache(maxsize=None)
def _tuned_kernel(block_d: int, k_bytes: int, v_bytes: int):
    """An autotuner over the configurations that fit, one per (head-dim block, element sizes)."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in configs_that_fit(block_d, k_bytes, v_bytes)]
    return triton.autotune(configs=configs, key=["HEAD_DIM", "N_BUCKET", "P_BUCKET"])(_ragged_attention_fwd)


def launch_grid(batch: int, heads: int, n: int, block_m: int) -> tuple[int]:
    """One flat grid axis: ``B*H * ceil(n / BLOCK_M)`` programs (CUDA allows 2**31 - 1 on axis 0, 65,535 on 1)."""
    return (batch * heads * triton.cdiv(n, block_m),)


def ragged_attention_triton(q_BHnD, k_pool_TD, v_pool_TD, seg_start, seg_len, k_BHnD, v_BHnD, *, scale: float,
                            out: torch.Tensor) -> torch.Tensor:
    """Launch the kernel; ``out [B, H, n, D]`` (any strides) is fully overwritten. Inputs are validated by the
    caller; no host synchronisation."""
    B, H, n, D = q_BHnD.shape
    if n == 0 or B * H == 0:
        return out
    block_d = max(16, triton.next_power_of_2(D))
    if k_pool_TD.shape[0] == 0:  # never dereferenced (all lengths 0) but needs a valid pointer
        k_pool_TD, v_pool_TD = k_BHnD.new_zeros(1, D), v_BHnD.new_zeros(1, D)
    interpreted = not q_BHnD.is_cuda or triton_interpreted()
    final = out
    if interpreted and out.dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16 stores: round in torch
        out = torch.empty(out.shape, dtype=torch.float32, device=out.device)
    args = (q_BHnD, k_pool_TD, v_pool_TD, k_BHnD, v_BHnD, out, seg_start, seg_len, n, H, scale * LOG2E,
            *q_BHnD.stride(), *k_pool_TD.stride(), *v_pool_TD.stride(), *k_BHnD.stride(), *v_BHnD.stride(),
            *out.stride(), triton.next_power_of_2(n), triton.next_power_of_2(max(1, k_pool_TD.shape[0] // (B * H))))
    if interpreted:
        block_m, block_n = INTERPRETER_BLOCKS
        _ragged_attention_fwd[launch_grid(B, H, n, block_m)](
            *args, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EMULATE_DOT=True)
    else:
        kernel = _tuned_kernel(block_d, k_pool_TD.element_size(), v_pool_TD.element_size())
        kernel[lambda meta: launch_grid(B, H, n, meta["BLOCK_M"])](
            *args, HEAD_DIM=D, BLOCK_D=block_d, EMULATE_DOT=False)
    if final is not out:
        final.copy_(out)
    return final
