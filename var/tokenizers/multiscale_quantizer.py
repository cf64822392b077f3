"""Residual multi-scale vector quantizer of VAR (``quantize.*`` keys of ``vae_ch160v4096z32.pth``).

A latent ``f [B, Cvae, n, n]`` (n = last patch size) is explained scale by scale: at scale ``si`` the residual is
area-downsampled to ``pn x pn``, quantized to the nearest code, bicubic-upsampled back to ``n x n``, passed
through the shared convolution phi and added to ``f_hat``. The same recurrence builds the transformer's input
for the next scale (:meth:`next_scale_input`), during training (:meth:`teacher_forcing_input`) and sampling.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Phi(nn.Conv2d):
    """``phi(h) = (1 - r) * h + r * conv3x3(h)`` with ``r = |quant_resi|``."""

    def __init__(self, channels: int, quant_resi: float):
        super().__init__(channels, channels, kernel_size=3, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    """``K`` phi convolutions shared by the scales; scale ``si`` of ``SN`` uses the one whose tick is nearest
    to ``si / (SN - 1)`` (ticks ``linspace(1/3K, 1-1/3K)`` for K = 4, else ``linspace(1/2K, 1-1/2K)``)."""

    def __init__(self, phis: Sequence[Phi]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)
        k = len(phis)
        self.ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)

    def index_for(self, si: int, num_scales: int) -> int:
        ratio = si / (num_scales - 1) if num_scales > 1 else 1.0
        return int(np.argmin(np.abs(self.ticks - ratio)))

    def for_scale(self, si: int, num_scales: int) -> Phi:
        return self.qresi_ls[self.index_for(si, num_scales)]


def area_resize(x_BChw: torch.Tensor, size: int) -> torch.Tensor:
    return x_BChw if x_BChw.shape[-1] == size else F.interpolate(x_BChw, size=(size, size), mode="area")


def bicubic_resize(x_BChw: torch.Tensor, size: int) -> torch.Tensor:
    return x_BChw if x_BChw.shape[-1] == size else F.interpolate(x_BChw, size=(size, size), mode="bicubic")


class MultiScaleQuantizer(nn.Module):
    """Codebook ``embedding [V, Cvae]``, the phi convolutions and the code-usage buffer ``ema_vocab_hit_SV``."""

    def __init__(self, vocab_size: int, channels: int, patch_nums: Sequence[int], *, beta: float = 0.25,
                 quant_resi: float = 0.5, share_quant_resi: int = 4):
        super().__init__()
        self.vocab_size, self.channels, self.beta = vocab_size, channels, beta
        self.patch_nums = tuple(patch_nums)
        num_phi = share_quant_resi if share_quant_resi > 0 else len(self.patch_nums)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.quant_resi = PhiPartiallyShared([Phi(channels, quant_resi) for _ in range(num_phi)])
        self.embedding = nn.Embedding(vocab_size, channels)

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def phi(self, si: int) -> Phi:
        return self.quant_resi.for_scale(si, self.num_scales)

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry (squared L2, first index on ties) for each row of ``z_NC``."""
        codes = self.embedding.weight
        dist = z_NC.pow(2).sum(dim=1, keepdim=True) + codes.pow(2).sum(dim=1)
        dist.addmm_(z_NC, codes.T, alpha=-2, beta=1)
        return dist.argmin(dim=1)

    def embed_indices(self, idx_Bhw: torch.Tensor) -> torch.Tensor:
        """Codes of a square index map ``[B, pn, pn]`` (or ``[B, pn*pn]``) as ``[B, Cvae, pn, pn]``."""
        B = idx_Bhw.shape[0]
        pn = round(idx_Bhw[0].numel() ** 0.5)
        return self.embedding(idx_Bhw.reshape(B, pn, pn)).permute(0, 3, 1, 2)

    def _scale_contribution(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        """phi(bicubic up-sampling of the scale-``si`` codes to the full latent size)."""
        return self.phi(si)(bicubic_resize(h_BChw, self.patch_nums[-1]).contiguous())

    def encode(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Residual quantization of a latent -> one LongTensor ``[B, pn, pn]`` per scale."""
        f_rest, indices = f_BChw.detach().float().clone(), []
        for si, pn in enumerate(self.patch_nums):
            z_BChw = area_resize(f_rest, pn)
            idx = self.nearest_code(z_BChw.permute(0, 2, 3, 1).reshape(-1, self.channels))
            idx_Bhw = idx.view(f_rest.shape[0], pn, pn)
            f_rest = f_rest - self._scale_contribution(si, self.embed_indices(idx_Bhw))
            indices.append(idx_Bhw)
        return indices

    def indices_to_fhat(self, indices: Sequence[torch.Tensor], cumulative: bool = False):
        """Sum of all scales' contributions -> ``f_hat [B, Cvae, n, n]`` (or the list of partial sums)."""
        f_hat, partial = 0.0, []
        for si, idx in enumerate(indices):
            f_hat = f_hat + self._scale_contribution(si, self.embed_indices(idx))
            partial.append(f_hat)
        return partial if cumulative else f_hat

    def next_scale_input(self, si: int, f_hat_BChw: torch.Tensor, h_BChw: torch.Tensor):
        """Add scale ``si``'s codes ``h [B, Cvae, pn, pn]`` to ``f_hat``; return ``(f_hat, next_input)`` where
        next_input is ``f_hat`` area-downsampled to the next scale (or ``f_hat`` itself after the last)."""
        f_hat_BChw = f_hat_BChw + self._scale_contribution(si, h_BChw)
        if si == self.num_scales - 1:
            return f_hat_BChw, f_hat_BChw
        return f_hat_BChw, area_resize(f_hat_BChw, self.patch_nums[si + 1])

    def teacher_forcing_input(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inputs of scales 1..SN-1 for the transformer: ``[B, L - 1, Cvae]`` (channel-last tokens)."""
        B = indices[0].shape[0]
        f_hat = torch.zeros(B, self.channels, self.patch_nums[-1], self.patch_nums[-1],
                            device=self.embedding.weight.device, dtype=torch.float32)
        inputs = []
        for si in range(self.num_scales - 1):
            f_hat, nxt_BChw = self.next_scale_input(si, f_hat, self.embed_indices(indices[si]).float())
            inputs.append(nxt_BChw.flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1)

    def forward(self, f_BChw: torch.Tensor):
        """Training pass: ``(f_hat with straight-through gradient, vq loss, per-scale code-usage [SN, V])``.

        Loss per scale ``beta * ||sg(f_hat) - f||^2 + ||f_hat - sg(f)||^2`` on the running ``f_hat``, averaged.
        """
        f = f_BChw.float()
        f_rest, f_hat = f.detach().clone(), torch.zeros_like(f)
        loss, usage = f.new_zeros(()), []
        for si, pn in enumerate(self.patch_nums):
            z_BChw = area_resize(f_rest, pn)
            idx = self.nearest_code(z_BChw.permute(0, 2, 3, 1).reshape(-1, self.channels))
            usage.append(torch.bincount(idx, minlength=self.vocab_size).float())
            h = self._scale_contribution(si, self.embed_indices(idx.view(f.shape[0], pn, pn)))
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
        f_hat_st = (f_hat - f).detach().add_(f)
        return f_hat_st, loss / self.num_scales, torch.stack(usage)
