"""LlamaGen's released files (c2i: ``vq_ds16_c2i.pt``, ``c2i_{B,L,XL,XXL,3B}_*.pt``; t2i: ``vq_ds16_t2i.pt``,
``t2i_XL_stage1_256.pt``, ``t2i_XL_stage2_512.pt``) and saved GPT/VQ directories.

* ``vq, gpt = load_llamagen(vq_path, gpt_path)``: strict loads; sizes are inferred from the state dicts, the
  token grid from ``image_size`` (256 -> 16 x 16 with the ds16 tokenizer, 384 -> 24 x 24), else from a saved
  directory's config or a released file name (``c2i_L_384.pt``). What a ``.pt`` does not store is never guessed:
  the head count is known only for the released sizes (:data:`RELEASED_GPT_HEADS`) and the VQ's GroupNorm count only
  for the released width (:data:`RELEASED_VQ_NORM_GROUPS`); other files need ``n_head`` / ``norm_groups`` /
  ``image_size`` or the :func:`~var.hub.save_pretrained` format.
* A released file name (``"c2i_L_384.pt"``) that is not a local file is downloaded from its Hugging Face repo
  (``FoundationVision/LlamaGen``; t2i files ``peizesun/llamagen_t2i``) (:mod:`var.hub.download`; never in tests).
* A GPT file holding ``cls_embedding.cap_proj`` is the text-to-image model (:class:`~var.models.gpt_t2i.GPTT2I`);
  its caption width and length come from ``uncond_embedding``. Stage 2 (512 px) needs ``image_size=512``.
* Files are read by :func:`var.hub.io.read_state_dict` (``{"model": sd, "args": Namespace, ...}`` of DDP runs or
  the raw dict of FSDP runs); the one conversion step drops the stale ``freqs_cis`` table of old checkpoints.
* Directories written by :func:`var.hub.save_pretrained` load too (classes ``GPT``, ``GPTT2I``, ``SingleScaleVQ``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from var.errors import CheckpointError, CheckpointMismatchError, ConfigError
from var.hub.download import resolve_checkpoint
from var.hub.io import (build_on_meta, bundled_pair, count_indexed, encoder_sizes, expect_type, load_pretrained,
                        load_strict, read_state_dict, released_norm_groups, require_keys)
from var.models.gpt import GPT, GPTConfig
from var.models.gpt_presets import GPT_SIZES
from var.models.gpt_t2i import GPTT2I, GPTT2IConfig
from var.models.nar import NAR
from var.models.nar_ctf_presets import LLAMAGEN_SIZES
from var.tokenizers.single_scale_vq import SingleScaleVQ, SingleScaleVQConfig

RELEASED_LLAMAGEN_REPO, RELEASED_LLAMAGEN_T2I_REPO = "FoundationVision/LlamaGen", "peizesun/llamagen_t2i"
RELEASED_LLAMAGEN_FILES = ("vq_ds16_c2i.pt", "vq_ds8_c2i.pt", "c2i_B_256.pt", "c2i_B_384.pt", "c2i_L_256.pt",
                           "c2i_L_384.pt", "c2i_XL_384.pt", "c2i_XXL_384.pt", "c2i_3B_384.pt")
RELEASED_LLAMAGEN_T2I_FILES = ("vq_ds16_t2i.pt", "t2i_XL_stage1_256.pt", "t2i_XL_stage2_512.pt")
RELEASED_LLAMAGEN = {**{name: RELEASED_LLAMAGEN_REPO for name in RELEASED_LLAMAGEN_FILES},
                     **{name: RELEASED_LLAMAGEN_T2I_REPO for name in RELEASED_LLAMAGEN_T2I_FILES}}
T2I_KEY = "cls_embedding.cap_proj.fc1.weight"  # only the text-to-image GPT has the caption projection
_DROPPED_KEYS = ("freqs_cis",)  # a non-persistent table some old LlamaGen checkpoints still carry
# (layers, width) -> heads of every released LlamaGen / NAR trunk: the files store no head count, and a wrong one
# loads without a shape error (the attention just computes something else)
RELEASED_GPT_HEADS = {**{(n_layer, dim): n_head for n_layer, n_head, dim in GPT_SIZES.values()},
                      **{(s["n_layer"], s["dim"]): s["n_head"] for s in LLAMAGEN_SIZES.values()}}
# (base width, width multipliers) of the released VQs (ds16 c2i/t2i, ds8) -> their GroupNorm count
RELEASED_VQ_NORM_GROUPS = {(128, (1, 1, 2, 2, 4)): 32, (128, (1, 2, 2, 4)): 32}
_RELEASED_SIZE = re.compile(r"_(\d+)\.pt$")  # c2i_L_384.pt, t2i_XL_stage2_512.pt


def resolve_llamagen_checkpoint(path_or_name: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """A local path as is; a released LlamaGen file name is downloaded (once) from its Hugging Face repo."""
    return resolve_checkpoint(path_or_name, RELEASED_LLAMAGEN, cache_dir)


def read_llamagen_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """:func:`var.hub.io.read_state_dict` without the stale ``freqs_cis`` entries of old LlamaGen files."""
    return {k: v for k, v in read_state_dict(path, key).items() if k not in _DROPPED_KEYS}


def is_t2i_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    return T2I_KEY in sd


def released_grid_size(path: str | os.PathLike, downsample: int = 16) -> int | None:
    """Token grid side of a released GPT file, from its name (``c2i_L_384.pt`` -> 24); ``None`` for other names."""
    name = Path(path).name
    m = _RELEASED_SIZE.search(name)
    return int(m.group(1)) // downsample if m and name in RELEASED_LLAMAGEN else None


def gpt_config_from_state_dict(sd: dict[str, torch.Tensor], grid_size: int = 16,
                               n_head: int | None = None, extra_layers: int = 0) -> GPTConfig:
    """Layers, width, heads, vocabulary, classes (or caption width and length) and FFN size. The files do not
    store the head count: without ``n_head`` it is taken from :data:`RELEASED_GPT_HEADS` (the trunk's layers, i.e.
    the file's minus ``extra_layers``, and width must be a released size), else :class:`CheckpointError`."""
    t2i = is_t2i_state_dict(sd)
    prefix = ("cls_embedding.uncond_embedding",) if t2i else ("cls_embedding.embedding_table.weight",)
    require_keys(sd, ("tok_embeddings.weight", *prefix, "output.weight"),
                 "a LlamaGen GPT (is this the tokenizer or a VAR file?)")
    vocab, dim = sd["tok_embeddings.weight"].shape
    n_layer = count_indexed(sd, r"layers\.(\d+)\.")
    if n_head is None:
        n_head = RELEASED_GPT_HEADS.get((n_layer - extra_layers, dim))
        if n_head is None:
            raise CheckpointError(
                f"a GPT with {n_layer - extra_layers} layers of width {dim} is not a released LlamaGen size and its "
                "file does not store the head count: pass n_head, or save the model with var.hub.save_pretrained "
                "(a directory with config.json)")
    hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
    if t2i:
        caption_len, caption_dim = sd["cls_embedding.uncond_embedding"].shape
        config = GPTT2IConfig(dim=dim, n_layer=n_layer, n_head=n_head, vocab_size=vocab, grid_size=grid_size,
                              caption_dim=caption_dim, caption_len=caption_len)
    else:
        config = GPTConfig(dim=dim, n_layer=n_layer, n_head=n_head, vocab_size=vocab, grid_size=grid_size,
                           num_classes=sd["cls_embedding.embedding_table.weight"].shape[0] - 1)
    if config.ffn_hidden != hidden:  # a non-default multiple_of (small models trained here)
        for multiple in (256, 128, 64, 32, 16, 8, 1):
            config.multiple_of = multiple
            if config.ffn_hidden == hidden:
                break
    return config


def vq_config_from_state_dict(sd: dict[str, torch.Tensor], image_size: int = 256,
                              norm_groups: int | None = None) -> SingleScaleVQConfig:
    """Width, levels, res blocks and codebook of a LlamaGen VQ state dict; the GroupNorm count (not stored) is
    ``norm_groups``, else the released one for a released width (:data:`RELEASED_VQ_NORM_GROUPS`)."""
    require_keys(sd, ("encoder.conv_in.weight", "quantize.embedding.weight", "quant_conv.weight"),
                     "a LlamaGen VQ tokenizer (is this a GPT's file?)")
    ch, ch_mult, num_res = encoder_sizes(sd, "conv_blocks", "res")
    vocab, dim = sd["quantize.embedding.weight"].shape
    usage = sd.get("quantize.codebook_used")
    norm_groups = released_norm_groups(norm_groups, RELEASED_VQ_NORM_GROUPS, (ch, ch_mult),
                                       f"a VQ of width {ch} x {ch_mult} is not a released LlamaGen VQ")
    return SingleScaleVQConfig(codebook_size=vocab, codebook_embed_dim=dim, z_channels=sd["quant_conv.weight"].shape[1],
                               ch=ch, ch_mult=ch_mult, num_res_blocks=num_res, norm_groups=norm_groups,
                               usage_window=usage.numel() if usage is not None else 65536, image_size=image_size)


def load_llamagen_gpt(path: str | os.PathLike, *, grid_size: int | None = None, n_head: int | None = None,
                      device="cpu", key: str | None = None) -> GPT:
    """A GPT (or :class:`GPTT2I` for a t2i file) from a released ``c2i_*.pt`` / ``t2i_*.pt``, a safetensors file
    or a :func:`~var.hub.save_pretrained` directory; ``key`` picks the entry of a training file (default:
    :data:`var.hub.io.UNWRAP_ORDER`, EMA weights first). A file's token grid is ``grid_size``, else its released
    name's (:func:`released_grid_size`); a directory's is its saved one."""
    path = resolve_llamagen_checkpoint(path)
    if path.is_dir():
        return expect_type(load_pretrained(path, device=device), GPT, path)
    grid_size = grid_size or released_grid_size(path)
    if grid_size is None:
        raise CheckpointError(f"{path} does not store its token grid and is not a released file name: pass "
                              "image_size (var-sample --image-size) or grid_size, or save the model with "
                              "var.hub.save_pretrained")
    sd = read_llamagen_state_dict(path, key)
    config = gpt_config_from_state_dict(sd, grid_size, n_head)
    cls = GPTT2I if isinstance(config, GPTT2IConfig) else GPT
    model = load_strict(build_on_meta(cls, config), sd, f"LlamaGen {cls.__name__} ({path.name})")
    return model.to(device).eval()


NAR_KEY = "medusa_output.weight"


def load_nar(path: str | os.PathLike, *, grid_size: int = 24, n_head: int | None = None, device="cpu") -> NAR:
    """A :class:`~var.models.nar.NAR` from a released NAR checkpoint (``c2i_<size>_384.pt``: LlamaGen's layout
    plus one extra block ``layers[n_layer]`` and ``medusa_norm`` / ``medusa_output``), a safetensors file or a
    saved directory. The released models generate at 384 px with the 16x VQ: ``grid_size=24``."""
    path = Path(path)
    if path.is_dir():
        return expect_type(load_pretrained(path, device=device), NAR, path)
    sd = read_llamagen_state_dict(path)
    require_keys(sd, (NAR_KEY, "medusa_norm.weight"), "a NAR GPT (a LlamaGen file has no vertical head)")
    config = gpt_config_from_state_dict(sd, grid_size, n_head, extra_layers=1)
    config.n_layer -= 1  # the file's last block belongs to the vertical head
    model = load_strict(build_on_meta(NAR, config), sd, f"NAR ({path.name})")
    return model.to(device).eval()


def load_llamagen_vq(path: str | os.PathLike, *, image_size: int | None = None, norm_groups: int | None = None,
                     device="cpu") -> SingleScaleVQ:
    """The single-scale VQ from ``vq_ds16_c2i.pt``, a safetensors file or a saved directory. A file's nominal
    image size is ``image_size`` (default 256, the released one; the VQ codes any multiple of its downsample)."""
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size <= 0):  # 0 used to mean 256 (``image_size or 256``)
        raise ConfigError(f"image_size must be a positive number of pixels, got {image_size!r}")
    path = resolve_llamagen_checkpoint(path)
    if path.is_dir():
        vq = expect_type(load_pretrained(path, device=device), SingleScaleVQ, path)
    else:
        sd = read_llamagen_state_dict(path)
        config = vq_config_from_state_dict(sd, image_size or 256, norm_groups)
        vq = load_strict(build_on_meta(SingleScaleVQ, config), sd, f"LlamaGen VQ ({path.name})")
    return vq.to(device).eval().requires_grad_(False)


def load_llamagen(vq_path=None, gpt_path=None, *, image_size: int | None = None, n_head: int | None = None,
                  norm_groups: int | None = None, device="cpu"):
    """``(vq, gpt)`` for sampling, both strict. ``image_size`` sets the GPT's token grid; without it a GPT file
    takes its released name's and a directory its saved grid, which must match a VQ directory's image size.
    ``n_head`` / ``norm_groups`` are the head and GroupNorm counts of non-released ``.pt`` files.
    ``load_llamagen()`` with no paths loads the bundled next-token model (``var/assets/ar_bundled``)."""
    from var.assets import bundled_ar_dir
    vq_path, gpt_path = bundled_pair(vq_path, gpt_path, ("vq_path", "gpt_path"), bundled_ar_dir(), "next-token model")
    vq = load_llamagen_vq(vq_path, image_size=image_size, norm_groups=norm_groups, device=device)
    if image_size is not None and image_size % vq.downsample:
        raise ConfigError(f"image_size {image_size} is not a multiple of the tokenizer's downsample {vq.downsample}")
    grid = image_size // vq.downsample if image_size is not None else None
    gpt = load_llamagen_gpt(gpt_path, grid_size=grid, n_head=n_head, device=device)
    if gpt.vocab_size != vq.vocab_size:
        raise CheckpointMismatchError(f"the GPT (V={gpt.vocab_size}): the tokenizer has V={vq.vocab_size}")
    gpt_grid = gpt.config.grid_size
    if grid is not None and gpt_grid != grid:
        raise CheckpointMismatchError(f"{image_size} px images ({grid}x{grid} tokens): the GPT directory was saved "
                                      f"with a {gpt_grid}x{gpt_grid} grid")
    vq_grid = vq.image_size // vq.downsample
    if gpt_grid != vq_grid:
        if Path(vq_path).is_dir():  # both sizes were saved: one of the two files is not the other's partner
            raise CheckpointMismatchError(
                f"the GPT's {gpt_grid}x{gpt_grid} token grid: the tokenizer in {vq_path} was saved for "
                f"{vq.image_size} px images ({vq_grid}x{vq_grid} tokens); pass image_size to choose")
        vq.config.image_size = gpt_grid * vq.downsample  # a VQ file's size was only the default: take the GPT's
    return vq, gpt.requires_grad_(False)


def load_t2i_bundle(directory: str | os.PathLike, *, device="cpu"):
    """``(vq, gpt, text_encoder)`` of a directory written by :mod:`var.train.t2i_bundled` (all strict). Without a
    ``tokenizer/`` the bundled AR model's is used (the installed t2i bundle shares it instead of a 3 MB copy)."""
    from var.assets import bundled_ar_dir
    from var.models.caption_encoder import CaptionEncoder
    directory = Path(directory)
    tokenizer = directory / "tokenizer"
    if not tokenizer.exists():
        if bundled_ar_dir() is None:
            raise CheckpointError(f"{directory} has no tokenizer/ and the bundled AR tokenizer is not installed")
        tokenizer = bundled_ar_dir() / "tokenizer"
    vq, gpt = load_llamagen(tokenizer, directory / "transformer", device=device)
    if not isinstance(gpt, GPTT2I):
        raise CheckpointMismatchError(f"a text-to-image GPT: {directory / 'transformer'} is class-conditional")
    enc = expect_type(load_pretrained(directory / "text_encoder", device=device), CaptionEncoder,
                      directory / "text_encoder")
    if enc.config.dim != gpt.config.caption_dim:
        raise CheckpointMismatchError(f"the GPT (caption_dim {gpt.config.caption_dim}): the text encoder has "
                                      f"dim {enc.config.dim}")
    return vq, gpt, enc.requires_grad_(False)
