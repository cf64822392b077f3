"""Image tokenizers: VAR's multi-scale residual VQ-VAE (and the single-scale VQ of LlamaGen)."""
from var.tokenizers.multiscale_vqvae import (VAR_PATCH_NUMS_256, VAR_PATCH_NUMS_512, MultiScaleVQVAE,
                                             MultiScaleVQVAEConfig)
from var.tokenizers.single_scale_vq import SingleScaleVQ, SingleScaleVQConfig

__all__ = ["MultiScaleVQVAE", "MultiScaleVQVAEConfig", "SingleScaleVQ", "SingleScaleVQConfig", "VAR_PATCH_NUMS_256",
           "VAR_PATCH_NUMS_512"]
