"""Loading Infinity's released files: the BSQ VAEs (``infinity_vae_d{16,24,32,64}.pth``, ``infinity_vae_d32reg.pth``)
and the transformer (``infinity_2b_reg.pth``), strictly, with the configuration inferred from the file.

* The VAE files hold ``{"vae": state_dict, ...}``. The original copies tensors by name and accepts keys with or
  without the ``.conv.`` / ``.norm.`` segments of its ``Conv`` / ``Normalize`` wrapper modules;
  :func:`convert_infinity_vae_state_dict` maps both spellings onto this package's plain names, and drops the
  quantizer's constant ``lfq.mask`` buffers (checked to be the bit weights ``2^(d-1) .. 1``).
* The transformer file is a flat state dict; :func:`convert_infinity_state_dict` maps ``block_chunks.{c}.module.{i}``
  onto ``blocks.{c * per_chunk + i}`` and drops the all-zero ``zero_k_bias`` buffers (checked). Unlike the
  original (``strict=False``), every other key must match: missing/unexpected keys raise
  :class:`~var.errors.CheckpointMismatchError`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from var.errors import CheckpointError, CheckpointMismatchError
from var.hub.io import (build_on_meta, check_file_kind, count_indexed, encoder_sizes, expect_type, load_pretrained,
                        load_strict, read_state_dict, released_norm_groups, require_keys)
from var.tokenizers.bsq_vae import BSQVAE, BSQVAEConfig

# modules the original wraps: Conv(...).conv, Normalize(...).norm
_CONV_WRAPPED = ("conv_in", "conv_out", "conv1", "conv2", "nin_shortcut", "conv", "q", "k", "v", "proj_out")
_NORM_WRAPPED = ("norm1", "norm2", "norm_out", "norm")
_WRAPPER_RE = re.compile(r"^(?P<parent>.*\.)?(?P<mod>[^.]+)\.(?P<seg>conv|norm)\.(?P<leaf>weight|bias)$")


def _strip_wrapper(key: str) -> str:
    m = _WRAPPER_RE.match(key)
    if m and ((m["seg"] == "conv" and m["mod"] in _CONV_WRAPPED) or (m["seg"] == "norm" and m["mod"] in _NORM_WRAPPED)):
        return f"{m['parent'] or ''}{m['mod']}.{m['leaf']}"
    return key


def convert_infinity_vae_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Released Infinity VAE keys -> :class:`~var.tokenizers.bsq_vae.BSQVAE` keys.

    ``encoder.conv_in.conv.weight`` -> ``encoder.conv_in.weight``, ``...norm1.norm.bias`` -> ``...norm1.bias``,
    ``...downsample.conv.conv.weight`` -> ``...downsample.conv.weight``; keys already without the wrapper segment
    stay as they are. ``quantizer.lfq.mask`` / ``quantize.lfq.mask`` are dropped after a check.
    """
    out = {}
    for key, value in sd.items():
        if key.endswith("lfq.mask"):
            d = value.numel()
            if not torch.equal(value.flatten().long().cpu(), 2 ** torch.arange(d - 1, -1, -1)):
                raise CheckpointError(f"{key} is not the BSQ bit-weight buffer 2^(d-1)..1")
            continue
        new = _strip_wrapper(key)
        if new in out:
            raise CheckpointError(f"{key} and another key both map to {new}")
        out[new] = value
    return out


# base width of every released Infinity VAE (d16/d24/d32/d64, ch_mult 1-2-4-4-4) -> its GroupNorm count
RELEASED_BSQ_NORM_GROUPS = {128: 32}


def bsq_vae_config_from_state_dict(sd: dict[str, torch.Tensor], norm_groups: int | None = None) -> BSQVAEConfig:
    """Bits per token, widths and depth of a converted VAE state dict. The GroupNorm count is not stored:
    ``norm_groups``, else the released one for the released width (:data:`RELEASED_BSQ_NORM_GROUPS`)."""
    require_keys(sd, ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight"),
                     "an Infinity BSQ VAE (is this a transformer's or VAR's file?)")
    if any(k.startswith("quantize.embedding") or k.startswith("quant_conv") for k in sd):
        raise CheckpointMismatchError("an Infinity BSQ VAE: this is a VQ-VAE with a codebook (VAR's tokenizer?)")
    ch, ch_mult, num_res = encoder_sizes(sd, "down", "block")
    groups = released_norm_groups(norm_groups, RELEASED_BSQ_NORM_GROUPS, ch,
                                  f"a BSQ VAE of width {ch} is not a released Infinity VAE")
    return BSQVAEConfig(codebook_dim=sd["encoder.conv_out.weight"].shape[0], ch=ch, ch_mult=ch_mult,
                        num_res_blocks=num_res, norm_groups=groups)


def read_infinity_vae_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``"vae"`` entry of a released VAE file (never ``"ema"``, like the original), or a plain state dict."""
    return read_state_dict(path, key="vae")


def load_bsq_vae(path: str | os.PathLike, *, device="cpu", norm_groups: int | None = None) -> BSQVAE:
    """The BSQ VAE from a released ``infinity_vae_d*.pth``, a safetensors file or a saved directory
    (``norm_groups``: the GroupNorm count of a non-released file)."""
    path = Path(path)
    if path.is_dir():
        vae = expect_type(load_pretrained(path, device=device), BSQVAE, path)
    else:
        sd = read_infinity_vae_state_dict(path)
        check_file_kind(sd, "an Infinity BSQ VAE", path)
        sd = convert_infinity_vae_state_dict(sd)
        vae = load_strict(build_on_meta(BSQVAE, bsq_vae_config_from_state_dict(sd, norm_groups)), sd,
                          f"Infinity BSQ VAE ({path.name})")
    return vae.to(device).eval().requires_grad_(False)


# ---- the transformer ------------------------------------------------------------------------------------------
_CHUNK_RE = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.*)$")
_ZERO_BUFFERS = ("zero_k_bias",)


def convert_infinity_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Released Infinity transformer keys -> :class:`~var.models.infinity.Infinity` keys, and the chunk count.

    ``block_chunks.{c}.module.{i}.X`` -> ``blocks.{c * per_chunk + i}.X`` (``blocks.{i}`` files pass through);
    the constant ``*.zero_k_bias`` buffers are dropped after checking they are zeros, and so are the training-only
    buffers the original also discards (``lvl_1L``, ``attn_bias_for_masking``, ``Infinity_*``).
    """
    chunks = {}
    for key in sd:
        if m := _CHUNK_RE.match(key):
            chunks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    per_chunk = max((max(v) + 1 for v in chunks.values()), default=0)
    if chunks and any(v != set(range(per_chunk)) for v in chunks.values()):
        raise CheckpointError("block_chunks hold different numbers of blocks")
    out = {}
    for key, value in sd.items():
        if key.rsplit(".", 1)[-1] in _ZERO_BUFFERS:
            if not value.is_meta and not bool((value == 0).all()):
                raise CheckpointError(f"{key} should be all zeros")
            continue
        if key in ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen"):
            continue
        if m := _CHUNK_RE.match(key):
            key = f"blocks.{int(m.group(1)) * per_chunk + int(m.group(2))}.{m.group(3)}"
        out[key] = value
    return out, max(len(chunks), 1)


def infinity_config_from_state_dict(sd: dict[str, torch.Tensor], block_chunks: int = 1):
    """Depth, width, heads, bits per token and text sizes of a converted Infinity state dict."""
    from var.models.infinity import InfinityConfig

    require_keys(sd, ("cfg_uncond", "text_proj_for_sos.ca.mat_q", "word_embed.weight", "head.weight",
                          "blocks.0.sa.scale_mul_1H11"),
                     "an Infinity transformer (is this the VAE, a text encoder or a VAR file?)")
    width = sd["pos_start"].shape[-1]
    text_maxlen, text_channels = sd["cfg_uncond"].shape
    return InfinityConfig(
        depth=count_indexed(sd, r"blocks\.(\d+)\."), width=width, num_heads=sd["blocks.0.sa.scale_mul_1H11"].shape[1],
        mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / width, codebook_dim=sd["word_embed.weight"].shape[1],
        text_channels=text_channels, text_maxlen=text_maxlen, pool_heads=sd["text_proj_for_sos.ca.mat_q"].shape[1],
        num_levels=sd["lvl_embed.weight"].shape[0], block_chunks=block_chunks)


def load_infinity_transformer(path: str | os.PathLike, *, device="cpu"):
    """Infinity from a released ``infinity_2b_reg.pth``, a safetensors file or a saved directory (strict)."""
    from var.models.infinity import Infinity

    path = Path(path)
    if path.is_dir():
        return expect_type(load_pretrained(path, device=device), Infinity, path).eval()
    sd = read_state_dict(path)
    check_file_kind(sd, "an Infinity transformer", path)
    sd, chunks = convert_infinity_state_dict(sd)
    model = load_strict(build_on_meta(Infinity, infinity_config_from_state_dict(sd, chunks)), sd,
                        f"Infinity ({path.name})")
    return model.to(device).eval()


def load_infinity(vae_path, model_path, *, device="cpu"):
    """``(vae, model)`` for sampling: strict loads; the VAE's bits per token must be the model's."""
    model = load_infinity_transformer(model_path, device=device)
    vae = load_bsq_vae(vae_path, device=device)
    if vae.codebook_dim != model.config.codebook_dim:
        raise CheckpointMismatchError(f"the Infinity model (d = {model.config.codebook_dim} bits per token): the VAE "
                                      f"has d = {vae.codebook_dim}")
    return vae, model.requires_grad_(False)
