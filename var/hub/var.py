"""VAR's released files (``vae_ch160v4096z32.pth``, ``var_d{16,20,24,30,36}.pth``) and saved VAR directories.

* ``tok, model = load_var(vae_path, var_path)``: depth, width, schedule inferred from the files, or directories
  written by :func:`var.hub.save_pretrained`. Every load is strict (:func:`var.hub.io.load_strict`).
* A released file name (``"var_d16.pth"``) that is not a local file is downloaded from the Hugging Face repo
  ``FoundationVision/var`` (:mod:`var.hub.download`; never needed by the tests).
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn as nn

from var.errors import CheckpointError, CheckpointMismatchError
from var.hub.download import resolve_checkpoint
from var.hub.io import (build_on_meta, bundled_pair, check_file_kind, count_indexed, encoder_sizes, expect_type,
                        load_pretrained, load_strict, read_state_dict, released_norm_groups, require_keys)
from var.models.registry import create
from var.models.var_model import VAR, VARConfig
from var.tokenizers.multiscale_vqvae import VAR_PATCH_NUMS_256, MultiScaleVQVAE, MultiScaleVQVAEConfig

RELEASED_VAR_REPO = "FoundationVision/var"
RELEASED_VAR_FILES = ("vae_ch160v4096z32.pth", "var_d16.pth", "var_d20.pth", "var_d24.pth", "var_d30.pth",
                      "var_d36.pth")
RELEASED_VAR = {name: RELEASED_VAR_REPO for name in RELEASED_VAR_FILES}  # file name -> Hugging Face repo


def resolve_var_checkpoint(path_or_name: str | os.PathLike, cache_dir: str | None = None):
    """A local path as is; a released VAR file name is downloaded (once) from ``FoundationVision/var``."""
    return resolve_checkpoint(path_or_name, RELEASED_VAR, cache_dir)


# ---- config inference from released state dicts -------------------------------------------------------------
def var_config_from_state_dict(sd: dict[str, torch.Tensor]) -> VARConfig:
    """Depth, width, heads, vocabulary, classes, schedule and AdaLN variant of a VAR state dict."""
    require_keys(sd, ("pos_1LC", "lvl_1L", "class_emb.weight", "word_embed.weight", "head.weight"),
                 "a VAR transformer (is this the tokenizer or another model's file?)")
    depth = count_indexed(sd, r"blocks\.(\d+)\.")
    levels = sd["lvl_1L"].flatten().tolist()
    patch_nums = tuple(round(levels.count(si) ** 0.5) for si in range(int(max(levels)) + 1))
    heads_key = "blocks.0.attn.scale_mul_1H11"
    width = sd["pos_1LC"].shape[-1]
    return VARConfig(depth=depth, width=width,
                     num_heads=sd[heads_key].shape[1] if heads_key in sd else depth,
                     num_classes=sd["class_emb.weight"].shape[0] - 1, vocab_size=sd["head.weight"].shape[0],
                     latent_channels=sd["word_embed.weight"].shape[1], patch_nums=patch_nums,
                     shared_aln="shared_ada_lin.1.weight" in sd, attn_l2_norm=heads_key in sd,
                     mlp_ratio=sd["blocks.0.ffn.fc1.weight"].shape[0] / width)


# (base width, width multipliers) of the released VQ-VAE (vae_ch160v4096z32.pth) -> its GroupNorm count
RELEASED_VQVAE_NORM_GROUPS = {(160, (1, 1, 2, 2, 4)): 32}


def vqvae_config_from_state_dict(sd: dict[str, torch.Tensor], patch_nums=None,
                                 norm_groups: int | None = None) -> MultiScaleVQVAEConfig:
    """Tokenizer sizes of a multi-scale VQ-VAE state dict. A plain state dict stores neither the schedule nor the
    GroupNorm count: ``patch_nums`` comes from the VAR model, ``norm_groups`` is given or the released one for the
    released width (:data:`RELEASED_VQVAE_NORM_GROUPS`); a wrong count loads without a shape error."""
    require_keys(sd, ("encoder.conv_in.weight", "quantize.embedding.weight", "quantize.ema_vocab_hit_SV"),
                 "a multi-scale VQ-VAE (is this a transformer's file?)")
    ch, ch_mult, num_res = encoder_sizes(sd, "down", "block")
    vocab, z = sd["quantize.embedding.weight"].shape
    num_phi = sum(1 for k in sd if re.match(r"quantize\.quant_resi\.qresi_ls\.\d+\.weight", k))
    num_scales = sd["quantize.ema_vocab_hit_SV"].shape[0]
    if patch_nums is None:
        if num_scales != len(VAR_PATCH_NUMS_256):
            raise CheckpointError(f"tokenizer has {num_scales} scales: pass patch_nums explicitly")
        patch_nums = VAR_PATCH_NUMS_256
    norm_groups = released_norm_groups(norm_groups, RELEASED_VQVAE_NORM_GROUPS, (ch, ch_mult),
                                       f"a tokenizer of width {ch} x {ch_mult} is not the released VQ-VAE")
    return MultiScaleVQVAEConfig(vocab_size=vocab, z_channels=z, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res,
                                 using_sa="encoder.down.%d.attn.0.qkv.weight" % (len(ch_mult) - 1) in sd,
                                 using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd, share_quant_resi=num_phi,
                                 patch_nums=tuple(patch_nums), norm_groups=norm_groups)


# ---- the public entry points --------------------------------------------------------------------------------
def load_var_transformer(path: str | os.PathLike, *, device="cpu", depth: int | None = None,
                         key: str | None = None) -> VAR:
    """A VAR transformer from a released ``var_d*.pth``, a safetensors file or a saved directory; ``key`` picks the
    entry of a training file (default: :data:`var.hub.io.UNWRAP_ORDER`, EMA weights first)."""
    path = resolve_var_checkpoint(path)
    if path.is_dir():
        model = expect_type(load_pretrained(path, device=device), VAR, path)
    else:
        sd = read_state_dict(path, key)
        check_file_kind(sd, "a VAR transformer", path)
        model = load_strict(build_on_meta(VAR, var_config_from_state_dict(sd)), sd, f"VAR ({path.name})")
    if depth is not None and model.config.depth != depth:
        raise CheckpointMismatchError(f"VAR-d{depth}: {path} holds a depth-{model.config.depth} model")
    return model.to(device).eval()


def load_var_tokenizer(path: str | os.PathLike, *, device="cpu", patch_nums=None,
                       norm_groups: int | None = None) -> MultiScaleVQVAE:
    """The multi-scale VQ-VAE from ``vae_ch160v4096z32.pth``, a safetensors file or a saved directory
    (``norm_groups``: the GroupNorm count of a non-released plain state dict)."""
    path = resolve_var_checkpoint(path)
    if path.is_dir():
        tok = expect_type(load_pretrained(path, device=device), MultiScaleVQVAE, path)
    else:
        sd = read_state_dict(path)
        check_file_kind(sd, "VAR's multi-scale VQ-VAE", path)
        config = vqvae_config_from_state_dict(sd, patch_nums, norm_groups)
        tok = load_strict(build_on_meta(MultiScaleVQVAE, config), sd, f"multi-scale VQ-VAE ({path.name})")
    return tok.to(device).eval().requires_grad_(False)


def load_var(vae_path=None, var_path=None, *, device="cpu", depth: int | None = None,
             norm_groups: int | None = None):
    """``(tokenizer, model)`` for sampling: strict loads, the model's schedule given to the tokenizer.
    ``load_var()`` with no paths loads the bundled VAR (``var/assets/var_bundled``)."""
    from var.assets import bundled_var_dir
    vae_path, var_path = bundled_pair(vae_path, var_path, ("vae_path", "var_path"), bundled_var_dir(), "VAR")
    model = load_var_transformer(var_path, device=device, depth=depth)
    tok = load_var_tokenizer(vae_path, device=device, patch_nums=model.config.patch_nums, norm_groups=norm_groups)
    if tok.vocab_size != model.config.vocab_size or tok.embed_dim != model.config.latent_channels:
        raise CheckpointMismatchError(
            f"the VAR model (V={model.config.vocab_size}, Cvae={model.config.latent_channels}): the tokenizer has "
            f"V={tok.vocab_size}, Cvae={tok.embed_dim}")
    if tuple(tok.patch_nums) != tuple(model.config.patch_nums):
        raise CheckpointMismatchError(f"the VAR model's schedule {model.config.patch_nums}: the tokenizer directory "
                                      f"uses {tok.patch_nums}")
    return tok, model.requires_grad_(False)


def create_pretrained(name: str, path, *, device="cpu") -> nn.Module:
    """Build preset ``name`` and strictly load ``path`` into it (a depth/model mismatch names the keys)."""
    module = create(name)
    return load_strict(module, read_state_dict(resolve_var_checkpoint(path)), name).to(device).eval()

