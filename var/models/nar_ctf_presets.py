"""Presets of the NAR and CTF models (importing this module registers them with ``var.models.create``).

Sizes follow the papers: NAR adds one block and one ``dim x V`` head to a LlamaGen GPT; the CTF stage-1 model is a
LlamaGen GPT over the K coarse labels; the CTF stage-2 model is a bidirectional LlamaGen-style transformer.
The ``*_tiny`` presets (4 x 4 grid, 64 codes, 10 classes) are for tests and CPU experiments.
"""
from __future__ import annotations

from var.models.ctf import CTFStage2, CTFStage2Config
from var.models.gpt import GPT, GPTConfig
from var.models.nar import NAR
from var.models.registry import register_model


LLAMAGEN_SIZES = {"b": dict(n_layer=12, n_head=12, dim=768), "m": dict(n_layer=18, n_head=16, dim=1024),
                  "l": dict(n_layer=24, n_head=16, dim=1024), "xl": dict(n_layer=36, n_head=20, dim=1280)}
TINY = dict(dim=64, n_layer=2, n_head=4, multiple_of=32, num_classes=10, vocab_size=64, grid_size=4)


@register_model
def nar_tiny(**overrides) -> NAR:
    """2 + 1 layers, width 64, 4 x 4 grid over 64 codes (tests)."""
    return NAR(GPTConfig(**{**TINY, **overrides}))


@register_model
def nar_b(**overrides) -> NAR:
    """NAR-B (130M): LlamaGen-B + one block + vertical head, 16 x 16 grid, V = 16384."""
    return NAR(GPTConfig(**{**LLAMAGEN_SIZES["b"], **overrides}))


@register_model
def nar_m(**overrides) -> NAR:
    """NAR-M (290M): LlamaGen-L with 18 layers."""
    return NAR(GPTConfig(**{**LLAMAGEN_SIZES["m"], **overrides}))


@register_model
def nar_l(**overrides) -> NAR:
    """NAR-L (372M)."""
    return NAR(GPTConfig(**{**LLAMAGEN_SIZES["l"], **overrides}))


@register_model
def ctf_stage1_tiny(**overrides) -> GPT:
    """Tiny stage-1 AR model over 8 coarse labels (tests)."""
    return GPT(GPTConfig(**{**TINY, "vocab_size": 8, **overrides}))


@register_model
def ctf_stage1_b(**overrides) -> GPT:
    """CTF stage 1 on LlamaGen-B over K = 512 coarse labels (87M)."""
    return GPT(GPTConfig(**{**LLAMAGEN_SIZES["b"], "vocab_size": 512, **overrides}))


@register_model
def ctf_stage1_l(**overrides) -> GPT:
    """CTF stage 1 on LlamaGen-L over K = 512 coarse labels (310M)."""
    return GPT(GPTConfig(**{**LLAMAGEN_SIZES["l"], "vocab_size": 512, **overrides}))


@register_model
def ctf_stage2_tiny(**overrides) -> CTFStage2:
    """Tiny stage-2 model: 8 coarse labels -> 64 codes on a 4 x 4 grid (tests)."""
    return CTFStage2(CTFStage2Config(**{**TINY, "num_coarse": 8, **overrides}))


@register_model
def ctf_stage2_l(**overrides) -> CTFStage2:
    """CTF's default auxiliary model (L size, 343M): K = 512 coarse labels -> V = 16384 codes."""
    return CTFStage2(CTFStage2Config(**{**LLAMAGEN_SIZES["l"], "num_coarse": 512, **overrides}))
