"""Presets of LlamaGen's released c2i GPTs and VQ tokenizers, and tiny configs for tests and CPU training.

Sizes (layers / heads / dim): B 12/12/768 (111M), L 24/16/1024 (343M), XL 36/20/1280 (775M),
XXL 48/24/1536 (1.4B), 3B 24/32/3200 (3.1B). ``grid_size`` is 16 for the 256 px checkpoints and 24 for 384 px.
"""
from __future__ import annotations

from var.models.gpt import GPT, GPTConfig
from var.models.gpt_t2i import GPTT2I, GPTT2IConfig
from var.models.registry import register_model
from var.tokenizers.single_scale_vq import SingleScaleVQ, SingleScaleVQConfig

GPT_SIZES = {"B": (12, 12, 768), "L": (24, 16, 1024), "XL": (36, 20, 1280), "XXL": (48, 24, 1536),
             "3B": (24, 32, 3200)}


def _gpt(size: str, overrides: dict) -> GPT:
    n_layer, n_head, dim = GPT_SIZES[size]
    return GPT(GPTConfig(**{"n_layer": n_layer, "n_head": n_head, "dim": dim, **overrides}))


@register_model
def gpt_b(**overrides) -> GPT:
    """LlamaGen GPT-B c2i (111M): ``c2i_B_256.pt``."""
    return _gpt("B", overrides)


@register_model
def gpt_l(**overrides) -> GPT:
    """LlamaGen GPT-L c2i (343M): ``c2i_L_256.pt`` / ``c2i_L_384.pt`` (grid_size=24)."""
    return _gpt("L", overrides)


@register_model
def gpt_xl(**overrides) -> GPT:
    """LlamaGen GPT-XL c2i (775M): ``c2i_XL_384.pt`` (grid_size=24)."""
    return _gpt("XL", overrides)


@register_model
def gpt_xxl(**overrides) -> GPT:
    """LlamaGen GPT-XXL c2i (1.4B): ``c2i_XXL_384.pt`` (grid_size=24)."""
    return _gpt("XXL", overrides)


@register_model
def gpt_3b(**overrides) -> GPT:
    """LlamaGen GPT-3B c2i (3.1B, head dim 100): ``c2i_3B_384.pt`` (grid_size=24)."""
    return _gpt("3B", overrides)


@register_model
def gpt_tiny(**overrides) -> GPT:
    """2 layers, width 64, 4 heads, 4x4 tokens over a 64-code vocabulary, 10 classes (tests, CPU training)."""
    defaults = dict(dim=64, n_layer=2, n_head=4, multiple_of=32, num_classes=10, vocab_size=64, grid_size=4)
    return GPT(GPTConfig(**{**defaults, **overrides}))


@register_model
def gpt_xl_t2i(**overrides) -> GPTT2I:
    """LlamaGen GPT-XL t2i (775M + caption MLP): ``t2i_XL_stage1_256.pt``; ``grid_size=32`` for
    ``t2i_XL_stage2_512.pt`` (same keys). Captions: 120 rows of flan-t5-xl features (2048-d)."""
    return GPTT2I(GPTT2IConfig(**overrides))


@register_model
def gpt_tiny_t2i(**overrides) -> GPTT2I:
    """gpt_tiny with an 8-row caption prefix of 16-d features (tests)."""
    cfg = dict(dim=64, n_layer=2, n_head=4, multiple_of=32, vocab_size=64, grid_size=4, caption_dim=16,
               caption_len=8)
    return GPTT2I(GPTT2IConfig(**{**cfg, **overrides}))


@register_model
def vq_ds16(**overrides) -> SingleScaleVQ:
    """LlamaGen ``vq_ds16_c2i.pt`` (ch 128, codebook 16384 x 8, L2-normalised codes, downsample 16)."""
    return SingleScaleVQ(SingleScaleVQConfig(**overrides))


@register_model
def vq_ds16_t2i(**overrides) -> SingleScaleVQ:
    """LlamaGen ``vq_ds16_t2i.pt``: the same architecture and key set as ``vq_ds16`` (weights trained for t2i)."""
    return SingleScaleVQ(SingleScaleVQConfig(**overrides))


@register_model
def vq_ds8(**overrides) -> SingleScaleVQ:
    """LlamaGen ``vq_ds8_c2i.pt`` (ch_mult 1-2-2-4, downsample 8)."""
    return SingleScaleVQ(SingleScaleVQConfig(**{"ch_mult": (1, 2, 2, 4), **overrides}))


@register_model
def vq_tiny(**overrides) -> SingleScaleVQ:
    """A 16 px single-scale tokenizer (ch 16, downsample 4, 64 codes of dim 8) -> 4x4 tokens, for tests."""
    defaults = dict(codebook_size=64, codebook_embed_dim=8, z_channels=16, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1,
                    norm_groups=8, usage_window=1024, image_size=16)
    return SingleScaleVQ(SingleScaleVQConfig(**{**defaults, **overrides}))
