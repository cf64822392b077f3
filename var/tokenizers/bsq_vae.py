"""Infinity's bitwise multi-scale tokenizer: a convolutional VAE with multi-scale binary spherical quantisation.

Every token is ``d`` bits (``d = codebook_dim``: 16, 24, 32 or 64 for the released VAEs; vocabulary ``2^d``).
Encoding an image ``[B, 3, H, W]`` in [-1, 1] gives one bit map ``[B, h_k, w_k, d]`` (int64 in {0, 1}) per scale of
a :class:`~var.utils.scales.ScaleSchedule`::

    residual = encoder(img)                              # [B, d, H/16, W/16]
    for (h, w) in schedule:
        r = area_resize(residual, (h, w))
        bits = r > 0   (per channel, after L2-normalising r over the channels: the sign is all that counts)
        code = (2 * bits - 1) / sqrt(d)                   # a point on the unit sphere
        up = bilinear_resize(code, (H/16, W/16));  residual -= up;  summed += up
    image = clamp(decoder(summed), -1, 1)

The next-scale input of the transformer is ``bilinear_resize(summed, next grid)`` (Infinity resizes with
``trilinear`` over a length-1 time axis, which is the same interpolation).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from var.errors import ConfigError, ImageSizeError
from var.utils.scales import ScaleSchedule
from var.tokenizers.vae_modules import Decoder, Encoder


@dataclass
class BSQVAEConfig:
    """Defaults are the released ``infinity_vae_d32`` (base width 128, ch_mult 1,2,4,4,4: stride 16)."""

    codebook_dim: int = 32             # bits per token d (16 / 24 / 32 / 64 released)
    ch: int = 128                      # base width of encoder and decoder
    ch_mult: tuple = (1, 2, 4, 4, 4)   # width multiplier per level; stride = 2^(len - 1)
    num_res_blocks: int = 2            # res blocks per encoder level (decoder: one more)
    norm_groups: int = 32              # GroupNorm groups (the original: 32, or 24 when 32 does not divide)
    in_channels: int = 3

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        if self.codebook_dim < 1:
            raise ConfigError(f"codebook_dim must be >= 1, got {self.codebook_dim}")
        if any((self.ch * m) % self.norm_groups for m in (1,) + self.ch_mult):
            raise ConfigError(f"every width ch * mult must be divisible by norm_groups={self.norm_groups}")

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def resize_latent(x_BdHW: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``area`` (down) or ``bilinear`` resize of a latent map; identity when the size already matches."""
    if tuple(x_BdHW.shape[-2:]) == tuple(size):
        return x_BdHW
    if mode == "area":
        return F.interpolate(x_BdHW, size=size, mode="area")
    return F.interpolate(x_BdHW, size=size, mode="bilinear", align_corners=False)


def bits_to_codes(bits_Bhwd: torch.Tensor, codebook_dim: int) -> torch.Tensor:
    """Bit labels ``[B, h, w, d]`` -> codes ``[B, d, h, w]`` fp32, ``+-1/sqrt(d)`` (L2-normalised like the original)."""
    scale = 1.0 / codebook_dim ** 0.5
    codes = bits_Bhwd.float() * (2 * scale) - scale
    return F.normalize(codes, dim=-1).permute(0, 3, 1, 2)


def quantize_bits(r_BdHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BSQ of one scale: ``(bits [B, h, w, d] int64, codes [B, d, h, w])``; a channel > 0 after L2 norm is bit 1."""
    u = F.normalize(r_BdHW.float(), dim=1)
    bits = (u > 0).long().permute(0, 2, 3, 1)
    return bits, bits_to_codes(bits, r_BdHW.shape[1])


class BSQVAE(nn.Module):
    """Images in [-1, 1] <-> per-scale bit labels; owns the next-scale input step of the Infinity transformer."""

    def __init__(self, config: BSQVAEConfig | None = None, **overrides):
        super().__init__()
        config = config or BSQVAEConfig(**overrides)
        self.config = config
        common = dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                      z_channels=config.codebook_dim, using_sa=False, using_mid_sa=False,
                      num_groups=config.norm_groups)
        self.encoder = Encoder(in_channels=config.in_channels, **common)
        self.decoder = Decoder(out_channels=config.in_channels, **common)

    @property
    def codebook_dim(self) -> int:
        return self.config.codebook_dim

    @property
    def stride(self) -> int:
        return self.config.stride

    def config_dict(self) -> dict:
        return asdict(self.config)

    # ---- latent <-> image ----------------------------------------------------------------------------------
    def encode_latent(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output ``[B, d, H/stride, W/stride]`` fp32."""
        if img_B3HW.ndim != 4 or img_B3HW.shape[1] != self.config.in_channels:
            raise ImageSizeError(f"images must be [B, {self.config.in_channels}, H, W], got {tuple(img_B3HW.shape)}")
        if img_B3HW.shape[-2] % self.stride or img_B3HW.shape[-1] % self.stride:
            raise ImageSizeError(f"image size {tuple(img_B3HW.shape[-2:])} is not a multiple of {self.stride}")
        return self.encoder(img_B3HW).float()

    def decode_latent(self, summed_BdHW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from accumulated codes ``[B, d, h, w]``."""
        return self.decoder(summed_BdHW).clamp(-1, 1)

    # ---- bits -----------------------------------------------------------------------------------------------
    def _check_schedule(self, schedule: ScaleSchedule, latent_hw) -> None:
        if schedule.grids[-1] != tuple(latent_hw):
            raise ImageSizeError(f"the schedule ends at {schedule.grids[-1]} tokens, the latent is {tuple(latent_hw)} "
                                 f"(image {latent_hw[0] * self.stride} x {latent_hw[1] * self.stride} px)")

    def quantize(self, latent_BdHW: torch.Tensor, schedule: ScaleSchedule) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Multi-scale residual BSQ: ``(bits per scale [B, h, w, d], summed codes [B, d, H, W])``."""
        self._check_schedule(schedule, latent_BdHW.shape[-2:])
        final = schedule.grids[-1]
        residual = latent_BdHW.float()
        summed = torch.zeros_like(residual)
        bits_list = []
        for hw in schedule.grids:
            bits, codes = quantize_bits(resize_latent(residual, hw, "area"))
            up = resize_latent(codes, final, "bilinear")
            residual = residual - up
            summed = summed + up
            bits_list.append(bits)
        return bits_list, summed

    @torch.no_grad()
    def encode(self, img_B3HW: torch.Tensor, schedule: ScaleSchedule) -> list[torch.Tensor]:
        """Bit labels ``[B, h, w, d]`` of every scale."""
        return self.quantize(self.encode_latent(img_B3HW), schedule)[0]

    def check_bits(self, bits_list: Sequence[torch.Tensor], schedule: ScaleSchedule) -> None:
        if len(bits_list) != schedule.num_scales:
            raise ConfigError(f"{len(bits_list)} bit maps for a {schedule.num_scales}-scale schedule")
        for si, (bits, hw) in enumerate(zip(bits_list, schedule.grids)):
            if bits.ndim != 4 or tuple(bits.shape[1:]) != (*hw, self.codebook_dim):
                raise ConfigError(f"scale {si}: bits must be [B, {hw[0]}, {hw[1]}, {self.codebook_dim}], "
                                  f"got {tuple(bits.shape)}")

    def add_scale(self, summed_BdHW: torch.Tensor | None, bits_Bhwd: torch.Tensor,
                  final_hw: tuple[int, int]) -> torch.Tensor:
        """Accumulate one scale's codes, upsampled to the final grid, into ``summed`` (None = zeros)."""
        up = resize_latent(bits_to_codes(bits_Bhwd, self.codebook_dim), tuple(final_hw), "bilinear")
        return up if summed_BdHW is None else summed_BdHW + up

    @staticmethod
    def scale_input(summed_BdHW: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Transformer input of the scale with grid ``hw``: ``[B, h*w, d]`` resized from the accumulated codes."""
        x = resize_latent(summed_BdHW, tuple(hw), "bilinear")
        return x.flatten(2).transpose(1, 2)

    def latent_from_bits(self, bits_list: Sequence[torch.Tensor], schedule: ScaleSchedule) -> torch.Tensor:
        self.check_bits(bits_list, schedule)
        summed = None
        for bits in bits_list:
            summed = self.add_scale(summed, bits, schedule.grids[-1])
        return summed

    @torch.no_grad()
    def decode(self, bits_list: Sequence[torch.Tensor], schedule: ScaleSchedule) -> torch.Tensor:
        """Images in [-1, 1] from the bit labels of every scale."""
        return self.decode_latent(self.latent_from_bits(bits_list, schedule))

    def teacher_forcing_input(self, bits_list: Sequence[torch.Tensor], schedule: ScaleSchedule) -> torch.Tensor:
        """Inputs of scales 1.. for teacher forcing: ``[B, L - 1, d]`` (what sampling builds step by step)."""
        self.check_bits(bits_list, schedule)
        summed, inputs = None, []
        for si in range(schedule.num_scales - 1):
            summed = self.add_scale(summed, bits_list[si], schedule.grids[-1])
            inputs.append(self.scale_input(summed, schedule.grids[si + 1]))
        if not inputs:
            return bits_list[0].new_zeros(bits_list[0].shape[0], 0, self.codebook_dim, dtype=torch.float32)
        return torch.cat(inputs, dim=1)
