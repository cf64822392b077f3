"""VAR's multi-scale residual VQ-VAE (tokenizer of ``vae_ch160v4096z32.pth``), any size configurable."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from var.errors import ConfigError, ImageSizeError
from var.tokenizers.base import VQTokenizerBase
from var.tokenizers.multiscale_quantizer import MultiScaleQuantizer
from var.tokenizers.vae_modules import PADDING_MODES, Decoder, Encoder
from var.utils.scales import ScaleSchedule

VAR_PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclass
class MultiScaleVQVAEConfig:
    """Defaults are the released VAR tokenizer (ch 160, codebook 4096 x 32, downsample 16, 10 scales)."""

    vocab_size: int = 4096               # codebook entries V
    z_channels: int = 32                 # code / latent channels Cvae
    ch: int = 160                        # base width of encoder and decoder
    ch_mult: tuple = (1, 1, 2, 2, 4)     # width multiplier per resolution level; downsample = 2^(len-1)
    num_res_blocks: int = 2              # res blocks per encoder level (decoder uses one more)
    dropout: float = 0.0
    using_sa: bool = True                # self-attention at the lowest resolution level
    using_mid_sa: bool = True            # self-attention in the middle block
    norm_groups: int = 32                # GroupNorm groups (small configs need a divisor of ch)
    beta: float = 0.25                   # commitment loss weight
    quant_resi: float = 0.5              # phi mixing ratio
    share_quant_resi: int = 4            # number of shared phi convolutions (0: one per scale)
    patch_nums: tuple = VAR_PATCH_NUMS_256  # side of each scale's token map; the last = latent side
    in_channels: int = 3
    # padding of the decoder's 3x3 convolutions: "zeros" (the released VAR) or "replicate" (the bundled model:
    # with zeros its small decoder drew a green top-right pixel into every image; see docs/models.md)
    decoder_padding_mode: str = "zeros"

    def __post_init__(self):
        self.ch_mult, self.patch_nums = tuple(self.ch_mult), tuple(self.patch_nums)
        if self.decoder_padding_mode not in PADDING_MODES:
            raise ConfigError(f"decoder_padding_mode must be one of {PADDING_MODES}, got {self.decoder_padding_mode!r}")
        if any(b <= a for a, b in zip(self.patch_nums, self.patch_nums[1:])) or self.patch_nums[0] < 1:
            raise ConfigError(f"patch_nums must be strictly increasing positive sizes, got {self.patch_nums}")
        if self.ch % self.norm_groups:
            raise ConfigError(f"ch={self.ch} must be divisible by norm_groups={self.norm_groups}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample


class MultiScaleVQVAE(VQTokenizerBase):
    """Images in [-1, 1] <-> one index map ``[B, pn, pn]`` per scale of ``patch_nums``.

    Owns the scale schedule and the next-scale input step used by the VAR transformer.
    """

    def __init__(self, config: MultiScaleVQVAEConfig | None = None, **overrides):
        super().__init__()
        config = config or MultiScaleVQVAEConfig(**overrides)
        self.config = config
        net = dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                   z_channels=config.z_channels, dropout=config.dropout, using_sa=config.using_sa,
                   using_mid_sa=config.using_mid_sa, num_groups=config.norm_groups)
        self.encoder = Encoder(in_channels=config.in_channels, **net)
        self.decoder = Decoder(out_channels=config.in_channels, padding_mode=config.decoder_padding_mode, **net)
        self.quantize = MultiScaleQuantizer(config.vocab_size, config.z_channels, config.patch_nums,
                                            beta=config.beta, quant_resi=config.quant_resi,
                                            share_quant_resi=config.share_quant_resi)
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 3, padding=1,
                                         padding_mode=config.decoder_padding_mode)  # the decoder's first conv

    # ---- schedule -------------------------------------------------------------------------------------------
    @property
    def patch_nums(self) -> tuple:
        return self.config.patch_nums

    @property
    def schedule(self) -> ScaleSchedule:
        """Token layout of the scales (ranges, levels, scale lookup)."""
        return ScaleSchedule(self.config.patch_nums)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def embed_dim(self) -> int:
        return self.config.z_channels

    # ---- image <-> latent -----------------------------------------------------------------------------------
    def check_images(self, images_B3HW: torch.Tensor) -> None:
        """Raise :class:`ImageSizeError` unless ``images`` is ``[B, C, S, S]`` with S = ``image_size``."""
        size, c = self.image_size, self.config.in_channels
        if images_B3HW.ndim != 4 or images_B3HW.shape[1] != c or tuple(images_B3HW.shape[2:]) != (size, size):
            raise ImageSizeError(f"this tokenizer takes images of shape [B, {c}, {size}, {size}] in [-1, 1], "
                                 f"got {tuple(images_B3HW.shape)}")

    # ---- tokenizer contract ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] ``[B, 3, S, S]`` -> list of LongTensor ``[B, pn, pn]``, one per scale."""
        return self.quantize.encode(self.encode_latent(images_B3HW))

    @torch.no_grad()
    def decode(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """List of index maps (all scales) -> images ``[B, 3, S, S]`` in [-1, 1]."""
        if len(indices) != len(self.patch_nums):
            raise ConfigError(f"decode needs {len(self.patch_nums)} scales of indices, got {len(indices)}")
        return self.latent_to_image(self.quantize.indices_to_fhat(indices))

    def embed(self, idx_Bhw: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, Cvae, pn, pn]`` of an index map (``[B, pn, pn]`` or ``[B, pn*pn]``)."""
        return self.quantize.embed_indices(idx_Bhw)

    def embed_soft(self, weights_BlV: torch.Tensor) -> torch.Tensor:
        """Codebook mixture ``weights @ codebook`` (fp32) of a square map: ``[B, pn*pn, V]`` -> ``[B, Cvae, pn, pn]``
        (VAR's ``more_smooth`` sampling feeds Gumbel-softmax weights instead of one code per token)."""
        B, l, _ = weights_BlV.shape
        pn = round(l ** 0.5)
        h_BlC = weights_BlV @ self.quantize.embedding.weight.float()
        return h_BlC.transpose(1, 2).reshape(B, -1, pn, pn)

    def next_scale_input(self, si: int, f_hat_BChw: torch.Tensor, h_BChw: torch.Tensor):
        """``(f_hat + phi(up(h)), f_hat area-resized to scale si + 1)``; see :class:`MultiScaleQuantizer`."""
        return self.quantize.next_scale_input(si, f_hat_BChw, h_BChw)

    def teacher_forcing_input(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Transformer inputs of scales 1.. ``[B, L - 1, Cvae]`` from ground-truth indices."""
        return self.quantize.teacher_forcing_input(indices)
