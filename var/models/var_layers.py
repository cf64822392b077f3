"""Layers of the VAR transformer: L2-normalised attention, FFN, AdaLN blocks and the AdaLN head.

Parameter names follow the released ``var_d*.pth`` files.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from var.kernels.kv_cache import KVCache


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p during training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q/k and a learned per-head logit scale (``attn_l2_norm``).

    ``logits = exp(min(scale_mul, ln 100)) * cos(q, k)``; K has no bias (``zero_k_bias`` buffer of zeros).
    """

    def __init__(self, width: int, num_heads: int, attn_l2_norm: bool = True, attn_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)
        self.attn_drop = attn_drop

    def _qkv(self, x_BLC: torch.Tensor):
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, D]
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        return q, k, v

    def forward(self, x_BLC: torch.Tensor, attn_bias: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """Training/teacher forcing: ``attn_bias [1, 1, L, L]`` additive mask. Inference: ``kv_cache`` holds all
        earlier scales; the ``L`` new tokens attend to them and to each other (full attention in a scale)."""
        B, L, C = x_BLC.shape
        q, k, v = self._qkv(x_BLC)
        if kv_cache is not None:
            out = kv_cache.attend(layer, q, k, v, scale=self.scale)
        else:
            if attn_bias is not None:
                attn_bias = attn_bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale,
                                                 dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    """fc1 -> GELU(tanh approximation) -> fc2."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """Transformer block modulated by the class condition.

    The six modulation vectors are ``[gamma1, gamma2, scale1, scale2, shift1, shift2]``, taken from the block's
    own ``ada_lin(cond)`` or, in the shared-AdaLN variant, ``ada_gss + shared_ada_lin(cond)``::

        x = x + gamma1 * Attn(LN(x) * (1 + scale1) + shift1)
        x = x + gamma2 * FFN (LN(x) * (1 + scale2) + shift2)
    """

    def __init__(self, width: int, cond_dim: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 norm_eps: float = 1e-6, drop_path: float = 0.0, attn_l2_norm: bool = True,
                 shared_aln: bool = False):
        super().__init__()
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width ** 0.5)
        self.attn = SelfAttention(width, num_heads, attn_l2_norm)
        self.ffn = FFN(width, round(width * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        if not shared_aln:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * width))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def modulation(self, cond_BD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``cond [B, D]`` (or the shared projection ``[B, 1, 6, C]``) -> six ``[B, 1, C]`` vectors."""
        if self.shared_aln:
            return (self.ada_gss + cond_BD).unbind(2)
        return self.ada_lin(cond_BD).view(cond_BD.shape[0], 1, 6, -1).unbind(2)

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor, attn_bias: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond_BD)
        h = self.ln_wo_grad(x_BLC).mul(scale1.add(1)).add_(shift1)
        x_BLC = x_BLC + self.drop_path(self.attn(h, attn_bias, kv_cache, layer).mul_(gamma1))
        h = self.ln_wo_grad(x_BLC).mul(scale2.add(1)).add_(shift2)
        return x_BLC + self.drop_path(self.ffn(h).mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    """Condition-modulated LayerNorm before the output head: ``LN(h) * (1 + scale) + shift``."""

    def __init__(self, width: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))

    def forward(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(cond_BD.shape[0], 1, 2, -1).unbind(2)
        return self.ln_wo_grad(h_BLC).mul(scale.add(1)).add_(shift)


def default_init_std(width: int) -> float:
    """VAR's and Infinity's truncated-normal initialisation std, sqrt(1 / (3 width))."""
    return (1 / width / 3) ** 0.5


@torch.no_grad()
def init_next_scale_weights(model: nn.Module, residual_outputs, *, init_adaln: float, init_adaln_gamma: float,
                            init_head: float, init_std: float) -> None:
    """The released ``init_weights`` of VAR and Infinity (training from scratch; released checkpoints overwrite it).

    Truncated-normal Linear and Embedding weights (std ``init_std``; negative: :func:`default_init_std`) with zero
    biases; the head times ``init_head`` and the head's AdaLN times ``init_adaln``; in every block the residual
    output projections ``residual_outputs(block)`` divided by sqrt(2 depth), the AdaLN scales/shifts times
    ``init_adaln`` and its gammas times ``init_adaln_gamma`` (the block's ``ada_gss`` when it shares the AdaLN
    projection, else its own ``ada_lin``).
    """
    C, depth = model.config.width, model.config.depth
    std = init_std if init_std >= 0 else default_init_std(C)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            nn.init.trunc_normal_(m.weight, std=std)
    model.head.weight.mul_(init_head)
    model.head.bias.zero_()
    model.head_nm.ada_lin[-1].weight.mul_(init_adaln)
    model.head_nm.ada_lin[-1].bias.zero_()
    for block in model.blocks:
        for lin in residual_outputs(block):
            lin.weight.div_((2 * depth) ** 0.5)
        if hasattr(block, "ada_gss"):  # [1, 1, 6, C]: gamma1, gamma2, then scales and shifts
            block.ada_gss[:, :, 2:].mul_(init_adaln)
            block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
        else:  # rows [6C, C] in the same order
            lin = block.ada_lin[-1]
            lin.weight[2 * C:].mul_(init_adaln)
            lin.weight[:2 * C].mul_(init_adaln_gamma)
            lin.bias.zero_()
