"""LlamaGen's single-scale VQ tokenizer (``vq_ds16_c2i.pt``): one ``[B, h, w]`` index map per image.

Codes are L2-normalised (``codebook_l2_norm``), so the nearest-code search is a cosine similarity and decoding uses
the normalised codebook rows. Module names follow the released checkpoint (``encoder.conv_blocks.{i}.res.{j}``,
``attn.{j}.{q,k,v,proj_out}``, ``mid.{0,1,2}``, ``quantize.codebook_used`` ...) so it loads strictly.
The ``encode``/``decode`` contract is the multi-scale tokenizer's with a single scale: ``encode`` returns a list
holding one LongTensor ``[B, h, w]`` and ``decode`` takes such a list.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from var.errors import ConfigError, ImageSizeError
from var.tokenizers.base import VQTokenizerBase
from var.tokenizers.vae_modules import Downsample, ResnetBlock, Upsample, group_norm, run_level


@dataclass
class SingleScaleVQConfig:
    """Defaults are LlamaGen's ``VQ_16`` (``vq_ds16_c2i.pt``: ch 128, codebook 16384 x 8, downsample 16)."""

    codebook_size: int = 16384           # codebook entries V
    codebook_embed_dim: int = 8          # code dim (after the 1x1 quant_conv)
    codebook_l2_norm: bool = True        # normalise codes and latents (cosine nearest neighbour)
    commit_loss_beta: float = 0.25       # commitment loss weight
    z_channels: int = 256                # encoder output / decoder input channels
    ch: int = 128                        # base width
    ch_mult: tuple = (1, 1, 2, 2, 4)     # width multiplier per level; downsample = 2^(len-1)
    num_res_blocks: int = 2              # res blocks per encoder level (decoder uses one more)
    norm_groups: int = 32                # GroupNorm groups (small configs need a divisor of ch)
    dropout: float = 0.0
    usage_window: int = 65536            # length of the ``codebook_used`` ring of recent indices
    image_size: int = 256                # default image side (any multiple of the downsample factor works)
    in_channels: int = 3

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)
        if self.ch % self.norm_groups:
            raise ConfigError(f"ch={self.ch} must be divisible by norm_groups={self.norm_groups}")
        if self.image_size % self.downsample:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of the downsample {self.downsample}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class SpatialAttn(nn.Module):
    """Single-head spatial self-attention with separate 1x1 ``q``, ``k``, ``v`` convolutions and a residual."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BChw.shape
        h = self.norm(x_BChw)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, scale=C ** -0.5)  # [B, 1, HW, C]
        return x_BChw + self.proj_out(out.squeeze(1).transpose(1, 2).reshape(B, C, H, W))


def _level(res: list, attn: list, resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.res, level.attn = nn.ModuleList(res), nn.ModuleList(attn)
    if resample is not None:
        setattr(level, name, resample)
    return level


class VQEncoder(nn.Module):
    """Image ``[B, 3, H, W]`` -> ``[B, z_channels, H/ds, W/ds]`` (attention only at the lowest level and mid)."""

    def __init__(self, c: SingleScaleVQConfig):
        super().__init__()
        g, last = c.norm_groups, len(c.ch_mult) - 1
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        in_mult = (1,) + c.ch_mult
        self.conv_blocks = nn.ModuleList()
        for i, mult in enumerate(c.ch_mult):
            block_in, block_out = c.ch * in_mult[i], c.ch * mult
            res, attn = [], []
            for _ in range(c.num_res_blocks):
                res.append(ResnetBlock(block_in, block_out, g, c.dropout))
                block_in = block_out
                if i == last:
                    attn.append(SpatialAttn(block_in, g))
            self.conv_blocks.append(_level(res, attn, Downsample(block_in) if i != last else None, "downsample"))
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, g, c.dropout), SpatialAttn(block_in, g),
                                  ResnetBlock(block_in, block_in, g, c.dropout)])
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, c.z_channels, 3, padding=1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_BChw)
        for level in self.conv_blocks:
            h = run_level(h, level.res, level.attn, getattr(level, "downsample", None))
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQDecoder(nn.Module):
    """``[B, z_channels, h, w]`` -> image ``[B, 3, h*ds, w*ds]`` (unclamped); ``conv_blocks.0`` is the lowest level."""

    def __init__(self, c: SingleScaleVQConfig):
        super().__init__()
        g, last = c.norm_groups, len(c.ch_mult) - 1
        block_in = c.ch * c.ch_mult[last]
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, g, c.dropout), SpatialAttn(block_in, g),
                                  ResnetBlock(block_in, block_in, g, c.dropout)])
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(c.ch_mult))):
            block_out = c.ch * c.ch_mult[i]
            res, attn = [], []
            for _ in range(c.num_res_blocks + 1):
                res.append(ResnetBlock(block_in, block_out, g, c.dropout))
                block_in = block_out
                if i == last:
                    attn.append(SpatialAttn(block_in, g))
            self.conv_blocks.append(_level(res, attn, Upsample(block_in) if i != 0 else None, "upsample"))
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, c.in_channels, 3, padding=1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z_BChw)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = run_level(h, level.res, level.attn, getattr(level, "upsample", None))
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Codebook ``embedding [V, Cq]`` (normalised on the fly when l2) and the ``codebook_used`` ring buffer."""

    def __init__(self, c: SingleScaleVQConfig):
        super().__init__()
        self.vocab_size, self.dim, self.l2_norm, self.beta = (c.codebook_size, c.codebook_embed_dim,
                                                              c.codebook_l2_norm, c.commit_loss_beta)
        self.embedding = nn.Embedding(c.codebook_size, c.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / c.codebook_size, 1.0 / c.codebook_size)
        if c.codebook_l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)
        self.register_buffer("codebook_used", torch.zeros(c.usage_window))

    def codebook(self) -> torch.Tensor:
        """The code vectors used for search and decoding ``[V, Cq]`` (unit norm when l2)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def _prepare(self, z_BChw: torch.Tensor) -> torch.Tensor:
        z = z_BChw.permute(0, 2, 3, 1).float()
        return F.normalize(z, dim=-1) if self.l2_norm else z

    def nearest(self, z_BhwC: torch.Tensor) -> torch.Tensor:
        """Index ``[B, h, w]`` of the nearest code (squared L2, first index on ties)."""
        codes = self.codebook().float()
        flat = z_BhwC.reshape(-1, self.dim)
        dist = flat.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * flat @ codes.T
        return dist.argmin(dim=1).view(z_BhwC.shape[:-1])

    def embed(self, idx_Bhw: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, Cq, h, w]`` of an index map."""
        return self.codebook()[idx_Bhw].permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def _track_usage(self, idx: torch.Tensor) -> None:
        n = min(idx.numel(), self.codebook_used.numel())
        self.codebook_used.copy_(torch.cat((self.codebook_used[n:], idx.reshape(-1)[-n:].float())))

    def forward(self, z_BChw: torch.Tensor):
        """Training pass: ``(z_q with straight-through gradient [B, Cq, h, w], vq loss, usage [1, V])``.

        Loss ``||z_q - sg(z)||^2 + beta * ||sg(z_q) - z||^2`` on the (normalised) latent.
        """
        z = self._prepare(z_BChw)
        idx = self.nearest(z.detach())
        z_q = self.codebook()[idx].float()
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z_q.detach(), z)
        if self.training:
            self._track_usage(idx)
        z_q = z + (z_q - z).detach()
        usage = torch.bincount(idx.reshape(-1), minlength=self.vocab_size).float()[None]
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, usage


class SingleScaleVQ(VQTokenizerBase):
    """Images in [-1, 1] <-> one index map ``[B, h, w]`` (``h = H / downsample``)."""

    def __init__(self, config: SingleScaleVQConfig | None = None, **overrides):
        super().__init__()
        config = config or SingleScaleVQConfig(**overrides)
        self.config = config
        self.encoder = VQEncoder(config)
        self.decoder = VQDecoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def embed_dim(self) -> int:
        return self.config.codebook_embed_dim

    @property
    def patch_nums(self) -> tuple:
        """The (single) token-map side at the default image size, for symmetry with the multi-scale tokenizer."""
        return (self.config.image_size // self.downsample,)

    def check_images(self, images_B3HW: torch.Tensor) -> None:
        """Raise :class:`ImageSizeError` unless ``images`` is ``[B, C, H, W]`` with H, W multiples of the downsample."""
        ds, c = self.downsample, self.config.in_channels
        if (images_B3HW.ndim != 4 or images_B3HW.shape[1] != c or images_B3HW.shape[2] % ds
                or images_B3HW.shape[3] % ds):
            raise ImageSizeError(f"this tokenizer takes images [B, {c}, H, W] in [-1, 1] with H and W multiples of "
                                 f"{ds}, got {tuple(images_B3HW.shape)}")

    @torch.no_grad()
    def encode(self, images_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] ``[B, 3, H, W]`` -> ``[idx [B, h, w]]`` (a one-element list)."""
        return [self.quantize.nearest(self.quantize._prepare(self.encode_latent(images_B3HW)))]

    @torch.no_grad()
    def decode(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[idx [B, h, w]]`` (or ``[idx [B, h*w]]`` for a square map) -> images ``[B, 3, H, W]`` in [-1, 1]."""
        if len(indices) != 1:
            raise ConfigError(f"a single-scale tokenizer decodes one index map, got {len(indices)}")
        return self.latent_to_image(self.embed(indices[0]).to(self.post_quant_conv.weight.dtype))

    def codebook(self, raw: bool = False) -> torch.Tensor:
        """The code vectors ``[V, Cq]`` the indices stand for (unit norm when the codebook is l2-normalised);
        ``raw``: the embedding table as stored, before that normalisation."""
        return self.quantize.embedding.weight if raw else self.quantize.codebook()

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, Cq, h, w]`` of ``[B, h, w]`` or square ``[B, h*w]`` indices."""
        if idx.ndim == 2:
            side = round(idx.shape[1] ** 0.5)
            if side * side != idx.shape[1]:
                raise ConfigError(f"cannot reshape {idx.shape[1]} tokens to a square map: pass [B, h, w]")
            idx = idx.view(idx.shape[0], side, side)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.vocab_size):
            raise ConfigError(f"token ids must be in [0, {self.vocab_size}), got [{idx.min()}, {idx.max()}]")
        return self.quantize.embed(idx)
