"""Convolutional encoder/decoder of the VQ-VAEs (the LDM/taming layout used by VAR's tokenizer).

Module names follow the released checkpoints (``down.{i}.block.{j}``, ``mid.attn_1``, ``nin_shortcut`` ...) so
that the original state dicts load without renaming.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


PADDING_MODES = ("zeros", "replicate", "reflect")


def conv3x3(c_in: int, c_out: int, padding_mode: str = "zeros") -> nn.Conv2d:
    """3x3 convolution keeping the size; ``padding_mode`` as in :class:`torch.nn.Conv2d` (no weights involved)."""
    return nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode=padding_mode)


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN-SiLU-conv twice with a residual (1x1 ``nin_shortcut`` when the channel count changes)."""

    def __init__(self, in_ch: int, out_ch: int, num_groups: int, dropout: float = 0.0, padding_mode: str = "zeros"):
        super().__init__()
        self.norm1 = group_norm(in_ch, num_groups)
        self.conv1 = conv3x3(in_ch, out_ch, padding_mode)
        self.norm2 = group_norm(out_ch, num_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = conv3x3(out_ch, out_ch, padding_mode)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a merged 1x1 ``qkv`` convolution and a residual."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BChw.shape
        q, k, v = self.qkv(self.norm(x_BChw)).reshape(B, 3, C, H * W).permute(1, 0, 3, 2).unsqueeze(2)  # 3x[B,1,HW,C]
        out = F.scaled_dot_product_attention(q, k, v, scale=C ** -0.5)  # [B, 1, HW, C]
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x_BChw + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int, padding_mode: str = "zeros"):
        super().__init__()
        self.conv = conv3x3(channels, channels, padding_mode)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2.0, mode="nearest"))


def run_level(h: torch.Tensor, blocks: nn.ModuleList, attn: nn.ModuleList,
              resample: nn.Module | None = None) -> torch.Tensor:
    """One resolution level of an encoder or decoder: each residual block (followed by its attention block when the
    level has them), then the level's down- or upsampling when it has one."""
    for j, block in enumerate(blocks):
        h = block(h)
        if len(attn):
            h = attn[j](h)
    return h if resample is None else resample(h)


def _maybe_attn(channels: int, enabled: bool, num_groups: int) -> nn.Module:
    return AttnBlock(channels, num_groups) if enabled else nn.Identity()


class Encoder(nn.Module):
    """Image ``[B, in_ch, H, W]`` -> latent ``[B, z_ch, H/2^(n-1), W/2^(n-1)]`` for ``n = len(ch_mult)``."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 in_channels: int = 3, dropout: float = 0.0, using_sa: bool = True, using_mid_sa: bool = True,
                 num_groups: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        last = len(ch_mult) - 1
        for i_level, mult in enumerate(ch_mult):
            level = nn.Module()
            block_in, block_out = ch * in_mult[i_level], ch * mult
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, num_groups, dropout))
                block_in = block_out
                if i_level == last and using_sa:
                    level.attn.append(AttnBlock(block_in, num_groups))
            if i_level != last:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, num_groups, dropout)
        self.mid.attn_1 = _maybe_attn(block_in, using_mid_sa, num_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, num_groups, dropout)
        self.norm_out = group_norm(block_in, num_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, img_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(img_BChw)
        for level in self.down:
            h = run_level(h, level.block, level.attn, getattr(level, "downsample", None))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent ``[B, z_ch, h, w]`` -> image ``[B, out_ch, h*2^(n-1), w*2^(n-1)]`` (unclamped).

    ``padding_mode`` of its 3x3 convolutions: "zeros" as released; "replicate" gives the corners no zero border
    to read their position from (a small zero-padded decoder trained briefly kept a wrong-coloured corner pixel).
    """

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 out_channels: int = 3, dropout: float = 0.0, using_sa: bool = True, using_mid_sa: bool = True,
                 num_groups: int = 32, padding_mode: str = "zeros"):
        super().__init__()
        pm = padding_mode
        last = len(ch_mult) - 1
        block_in = ch * ch_mult[last]
        self.conv_in = conv3x3(z_channels, block_in, pm)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, num_groups, dropout, pm)
        self.mid.attn_1 = _maybe_attn(block_in, using_mid_sa, num_groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, num_groups, dropout, pm)
        levels = []  # built from the lowest resolution up, stored by resolution index (up.0 = full size)
        for i_level in reversed(range(len(ch_mult))):
            level = nn.Module()
            block_out = ch * ch_mult[i_level]
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, num_groups, dropout, pm))
                block_in = block_out
                if i_level == last and using_sa:
                    level.attn.append(AttnBlock(block_in, num_groups))
            if i_level != 0:
                level.upsample = Upsample(block_in, pm)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, num_groups)
        self.conv_out = conv3x3(block_in, out_channels, pm)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z_BChw))))
        for level in reversed(self.up):
            h = run_level(h, level.block, level.attn, getattr(level, "upsample", None))
        return self.conv_out(F.silu(self.norm_out(h)))
