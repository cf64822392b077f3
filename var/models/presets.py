"""Presets of the released VAR models and VQ-VAE, and tiny configs for tests and CPU training."""
from __future__ import annotations

from var.models.registry import register_model
from var.models.var_model import VAR, VARConfig
from var.tokenizers.multiscale_vqvae import VAR_PATCH_NUMS_512, MultiScaleVQVAE, MultiScaleVQVAEConfig

TINY_PATCH_NUMS = (1, 2, 3, 4)


def _var(**kwargs) -> VAR:
    return VAR(VARConfig(**kwargs))


@register_model
def var_d16(**overrides) -> VAR:
    """VAR-d16 (310M), ImageNet 256: ``var_d16.pth`` of FoundationVision/var."""
    return _var(**{"depth": 16, **overrides})


@register_model
def var_d20(**overrides) -> VAR:
    """VAR-d20 (600M), ImageNet 256: ``var_d20.pth``."""
    return _var(**{"depth": 20, **overrides})


@register_model
def var_d24(**overrides) -> VAR:
    """VAR-d24 (1.0B), ImageNet 256: ``var_d24.pth``."""
    return _var(**{"depth": 24, **overrides})


@register_model
def var_d30(**overrides) -> VAR:
    """VAR-d30 (2.0B), ImageNet 256: ``var_d30.pth``."""
    return _var(**{"depth": 30, **overrides})


@register_model
def var_d36(**overrides) -> VAR:
    """VAR-d36-s (2.3B, shared AdaLN), ImageNet 512: ``var_d36.pth``; uses the 256 px VQ-VAE at 512 px."""
    return _var(**{"depth": 36, "shared_aln": True, "patch_nums": VAR_PATCH_NUMS_512, **overrides})


@register_model
def var_tiny(**overrides) -> VAR:
    """A 2-layer, width-64 VAR over a 4-scale, 64-code tokenizer (tests and CPU experiments)."""
    return _var(**{"depth": 2, "width": 64, "num_heads": 4, "num_classes": 10, "vocab_size": 64,
                   "latent_channels": 8, "patch_nums": TINY_PATCH_NUMS, **overrides})


@register_model
def msvq_var(**overrides) -> MultiScaleVQVAE:
    """The released VAR tokenizer ``vae_ch160v4096z32.pth`` (ch 160, V 4096, Cvae 32, downsample 16)."""
    return MultiScaleVQVAE(MultiScaleVQVAEConfig(**overrides))


@register_model
def msvq_tiny(**overrides) -> MultiScaleVQVAE:
    """A 16 px multi-scale tokenizer (ch 16, downsample 4, V 64, Cvae 8, scales 1-2-3-4) for tests."""
    defaults = dict(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8,
                    patch_nums=TINY_PATCH_NUMS)
    return MultiScaleVQVAE(MultiScaleVQVAEConfig(**{**defaults, **overrides}))
