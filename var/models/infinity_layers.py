"""Layers of the Infinity transformer: 2-D RoPE, cosine self-attention, text cross-attention, the attentive text
pool and the cross-attention block. Parameter names follow the released ``infinity_2b_reg.pth``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from var.errors import ConfigError
from var.kernels.kv_cache import KVCache
from var.models.var_layers import FFN, DropPath
from var.utils.scales import ScaleSchedule

ROPE_MAX_GRID = 128  # 2048 px / 16: the largest token grid the RoPE table covers


def rope_angles(schedule: ScaleSchedule, head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Angles ``[L, head_dim / 2]`` fp32 of every token of ``schedule``: the first half of the frequencies turn
    with the row, the second half with the column, each position placed on the schedule's ``rope_grid``."""
    if head_dim % 4:
        raise ConfigError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))  # [half / 2]
    H, W = schedule.rope_grid
    pieces = []
    for h, w in schedule.grids:
        rows = (torch.arange(h) * (H / h)).round().long()  # float32 product then round, like the original
        cols = (torch.arange(w) * (W / w)).round().long()
        if int(rows.max()) >= ROPE_MAX_GRID or int(cols.max()) >= ROPE_MAX_GRID:
            raise ConfigError(f"RoPE grid {schedule.rope_grid} exceeds {ROPE_MAX_GRID} x {ROPE_MAX_GRID}")
        ang_h = rows.float()[:, None] * inv_freq  # [h, half / 2]
        ang_w = cols.float()[:, None] * inv_freq  # [w, half / 2]
        grid = torch.cat((ang_h[:, None].expand(h, w, -1), ang_w[None].expand(h, w, -1)), dim=-1)
        pieces.append(grid.reshape(h * w, half))
    return torch.cat(pieces)


def apply_rope(x_BHLD: torch.Tensor, cos_LD2: torch.Tensor, sin_LD2: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs ``(x[2i], x[2i+1])`` by the angles (fp32)."""
    x = x_BHLD.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    out = torch.stack((cos_LD2 * x0 - sin_LD2 * x1, sin_LD2 * x0 + cos_LD2 * x1), dim=-1)
    return out.flatten(-2).to(x_BHLD.dtype)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` in fp32 (Infinity's ``text_norm`` on the T5 features)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add(self.eps)) * self.weight


class RoPESelfAttention(nn.Module):
    """Cosine attention (q, k L2-normalised, q scaled by ``exp(min(scale_mul, ln 100))``) with 2-D RoPE applied
    after the normalisation; K has no bias (the released files' all-zero ``zero_k_bias`` buffers are dropped). Over a :class:`~var.kernels.KVCache` when one is given."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.max_scale_mul = math.log(100)
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x_BLC: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], attn_bias=None,
                kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, D]
        scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
        q = apply_rope(F.normalize(q, dim=-1).mul(scale_mul), *rope)
        k = apply_rope(F.normalize(k, dim=-1), *rope)
        if kv_cache is not None:
            out = kv_cache.attend(layer, q, k, v, scale=1.0)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


def masked_cross_attention(q_BHlD, k_BHND, v_BHND, mask_BN: torch.Tensor) -> torch.Tensor:
    """Each row's queries attend only its own real text tokens (``mask_BN`` True), scale ``1/sqrt(D)``."""
    return F.scaled_dot_product_attention(q_BHlD, k_BHND, v_BHND, attn_mask=mask_BN[:, None, None, :])


class TextCrossAttention(nn.Module):
    """Plain multi-head cross-attention from image tokens (``mat_q``) to projected text tokens (``mat_kv``)."""

    def __init__(self, width: int, kv_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.mat_q = nn.Linear(width, width)
        self.mat_kv = nn.Linear(kv_dim, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def kv(self, text_BNC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = text_BNC.shape
        kv = F.linear(text_BNC, self.mat_kv.weight, torch.cat((torch.zeros_like(self.v_bias), self.v_bias)))
        k, v = kv.view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(self, x_BLC: torch.Tensor, text_BNC: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
        B, L, C = x_BLC.shape
        q = self.mat_q(x_BLC).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(text_BNC)
        return self.proj(masked_cross_attention(q, k, v, mask_BN).transpose(1, 2).reshape(B, L, C))


class TextAttentivePool(nn.Module):
    """Pools the text into one ``[B, D]`` vector: a learned query per head (``ca.mat_q [1, H, D/H]``) attends over
    the normalised T5 features. The start token and every AdaLN are conditioned on it."""

    def __init__(self, text_channels: int, width: int, num_heads: int):
        super().__init__()
        self.ca = nn.Module()
        head_dim = width // num_heads
        self.ca.mat_q = nn.Parameter(torch.empty(1, num_heads, head_dim))
        nn.init.trunc_normal_(self.ca.mat_q, std=(1 / width / 3) ** 0.5)
        self.ca.mat_kv = nn.Linear(text_channels, 2 * width, bias=False)
        self.ca.v_bias = nn.Parameter(torch.zeros(width))
        self.ca.proj = nn.Linear(width, width)
        self.num_heads, self.head_dim = num_heads, head_dim

    def forward(self, text_BNC: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
        B, N, _ = text_BNC.shape
        ca = self.ca
        kv = F.linear(text_BNC, ca.mat_kv.weight, torch.cat((torch.zeros_like(ca.v_bias), ca.v_bias)))
        k, v = kv.view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = ca.mat_q.to(k.dtype).unsqueeze(2).expand(B, -1, 1, -1)  # [B, H, 1, D]
        out = masked_cross_attention(q, k, v, mask_BN)  # [B, H, 1, D]
        return ca.proj(out.reshape(B, -1))


class CrossAttnBlock(nn.Module):
    """Self-attention (shared AdaLN), text cross-attention (affine LayerNorm ``ca_norm``), FFN (shared AdaLN)::

        x = x + gamma1 * SA(LN(x) * (1 + scale1) + shift1)
        x = x + CA(ca_norm(x), text)
        x = x + gamma2 * FFN(LN(x) * (1 + scale2) + shift2)

    with ``gamma1, gamma2, scale1, scale2, shift1, shift2 = (ada_gss + shared_ada_lin(cond)).unbind(2)``.
    """

    def __init__(self, width: int, num_heads: int, ffn_hidden: int, *, norm_eps: float = 1e-6,
                 drop_path: float = 0.0):
        super().__init__()
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width ** 0.5)
        self.sa = RoPESelfAttention(width, num_heads)
        self.ca = TextCrossAttention(width, width, num_heads)
        self.ffn = FFN(width, ffn_hidden)
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ca_norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x_BLC, gss_B16C, text_BNC, mask_BN, rope, attn_bias=None, kv_cache=None, layer: int = 0):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + gss_B16C).unbind(2)
        h = self.ln_wo_grad(x_BLC.float()).mul(scale1.add(1)).add_(shift1)
        x_BLC = x_BLC + self.drop_path(self.sa(h, rope, attn_bias, kv_cache, layer).mul_(gamma1))
        x_BLC = x_BLC + self.ca(self.ca_norm(x_BLC), text_BNC, mask_BN).float()
        h = self.ln_wo_grad(x_BLC.float()).mul(scale2.add(1)).add_(shift2)
        return x_BLC + self.drop_path(self.ffn(h).mul(gamma2))
