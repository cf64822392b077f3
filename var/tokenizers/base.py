"""Plumbing shared by the VQ tokenizers: ``encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder``."""
from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn as nn


class VQTokenizerBase(nn.Module):
    """Base of :class:`MultiScaleVQVAE` and :class:`SingleScaleVQ`.

    A subclass sets ``config`` (with ``downsample`` and ``image_size``), ``encoder``, ``decoder``, ``quantize``
    (training call ``quantize(latent) -> (quantised latent, vq loss, code usage)``), ``quant_conv`` and
    ``post_quant_conv``, and implements ``check_images``.
    """

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def check_images(self, images_B3HW: torch.Tensor) -> None:
        raise NotImplementedError

    def encode_latent(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Continuous pre-quantisation latent ``quant_conv(encoder(img))`` ``[B, C, h, w]``."""
        self.check_images(images_B3HW)
        return self.quant_conv(self.encoder(images_B3HW))

    def latent_to_image(self, latent_BChw: torch.Tensor) -> torch.Tensor:
        """Decode a quantised (for VAR: accumulated) latent ``[B, C, h, w]`` to an image in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latent_BChw)).clamp(-1, 1)

    def forward(self, images_B3HW: torch.Tensor):
        """Training pass: ``(reconstruction (unclamped), vq loss, code usage [scales, V])``."""
        latent_q, vq_loss, usage = self.quantize(self.encode_latent(images_B3HW))
        return self.decoder(self.post_quant_conv(latent_q)), vq_loss, usage

    def config_dict(self) -> dict:
        return asdict(self.config)
