"""Loading LlamaGen's released files (``vq_ds16_c2i.pt``, ``c2i_{B,L,XL,XXL,3B}_*.pt``; t2i: ``vq_ds16_t2i.pt``,
``t2i_XL_stage1_256.pt``, ``t2i_XL_stage2_512.pt``) and our own directories.

* ``vq, gpt = load_llamagen(vq_path, gpt_path)``: strict loads; sizes are inferred from the state dicts, the
  token grid from ``image_size`` (256 -> 16 x 16 with the ds16 tokenizer, 384 -> 24 x 24).
* LlamaGen wraps weights in ``{"model": ...}`` (DDP) or stores the raw dict (FSDP), and pickles an
  ``argparse.Namespace`` next to them: files are read with ``torch.load(weights_only=True)`` with the Namespace on
  the safe-globals allow-list; stale ``freqs_cis`` entries of old checkpoints are dropped.
* A GPT file holding ``cls_embedding.cap_proj`` is the text-to-image model (:class:`~var.models.gpt_t2i.GPTT2I`);
  its caption width and length come from ``uncond_embedding``. Stage 2 (512 px) needs ``image_size=512``.
* Directories written by :func:`var.hub.save_pretrained` (``config.json`` + ``model.safetensors``) load too: the
  classes ``GPT`` and ``SingleScaleVQ`` are listed in ``var.hub.saved_model_classes``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from var import hub
from var.errors import CheckpointError, CheckpointMismatchError
from var.models.gpt import GPT, GPTConfig
from var.models.gpt_t2i import GPTT2I, GPTT2IConfig
from var.models.nar import NAR
from var.tokenizers.single_scale_vq import SingleScaleVQ, SingleScaleVQConfig


_DROPPED_KEYS = ("freqs_cis",)  # a non-persistent table some old LlamaGen checkpoints still carry


def read_llamagen_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a LlamaGen ``.pt`` (``{"model": sd, "args": Namespace, ...}`` or a raw dict) or a safetensors
    file / saved directory; optimizer state and the pickled Namespace are ignored."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return hub.read_state_dict(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or pickles something outside the allow-list
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict", "ema"):  # LlamaGen's own order ("model" for DDP files)
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k: v for k, v in obj.items() if k not in _DROPPED_KEYS}


T2I_KEY = "cls_embedding.cap_proj.fc1.weight"


def is_t2i_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    return T2I_KEY in sd


def gpt_config_from_state_dict(sd: dict[str, torch.Tensor], grid_size: int = 16,
                               n_head: int | None = None) -> GPTConfig:
    """Layers, width, heads, vocabulary, classes (or caption width and length) and FFN size. The files do not
    store the head count: it is the released models' (head dim 64, or 100 for the 3B model) unless ``n_head``."""
    t2i = is_t2i_state_dict(sd)
    prefix = ("cls_embedding.uncond_embedding",) if t2i else ("cls_embedding.embedding_table.weight",)
    hub.require_keys(sd, ("tok_embeddings.weight", *prefix, "output.weight"),
                     "a LlamaGen GPT (is this the tokenizer or a VAR file?)")
    vocab, dim = sd["tok_embeddings.weight"].shape
    n_layer = hub.count_indexed(sd, r"layers\.(\d+)\.")
    n_head = n_head or (32 if dim == 3200 else max(dim // 64, 1))
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


def vq_config_from_state_dict(sd: dict[str, torch.Tensor], image_size: int = 256) -> SingleScaleVQConfig:
    """Width, levels, res blocks, codebook and GroupNorm groups of a LlamaGen VQ state dict."""
    hub.require_keys(sd, ("encoder.conv_in.weight", "quantize.embedding.weight", "quant_conv.weight"),
                     "a LlamaGen VQ tokenizer (is this a GPT's file?)")
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = hub.count_indexed(sd, r"encoder\.conv_blocks\.(\d+)\.")
    ch_mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels))
    num_res = hub.count_indexed(sd, r"encoder\.conv_blocks\.0\.res\.(\d+)\.")
    vocab, dim = sd["quantize.embedding.weight"].shape
    usage = sd.get("quantize.codebook_used")
    return SingleScaleVQConfig(codebook_size=vocab, codebook_embed_dim=dim, z_channels=sd["quant_conv.weight"].shape[1],
                               ch=ch, ch_mult=ch_mult, num_res_blocks=num_res, norm_groups=32 if ch % 32 == 0 else ch,
                               usage_window=usage.numel() if usage is not None else 65536, image_size=image_size)


def load_llamagen_gpt(path: str | os.PathLike, *, grid_size: int = 16, n_head: int | None = None,
                      device="cpu") -> GPT:
    """A GPT (or :class:`GPTT2I` for a t2i file) from a released ``c2i_*.pt`` / ``t2i_*.pt``, a safetensors file
    or a :func:`~var.hub.save_pretrained` directory."""
    path = Path(path)
    if path.is_dir():
        return hub.expect_type(hub.load_pretrained(path, device=device), GPT, path)
    sd = read_llamagen_state_dict(path)
    config = gpt_config_from_state_dict(sd, grid_size, n_head)
    cls = GPTT2I if isinstance(config, GPTT2IConfig) else GPT
    model = hub.load_strict(hub._build_on_meta(cls, config), sd, f"LlamaGen {cls.__name__} ({path.name})")
    return model.to(device).eval()


NAR_KEY = "medusa_output.weight"


def load_nar(path: str | os.PathLike, *, grid_size: int = 24, n_head: int | None = None, device="cpu") -> NAR:
    """A :class:`~var.models.nar.NAR` from a released NAR checkpoint (``c2i_<size>_384.pt``: LlamaGen's layout
    plus one extra block ``layers[n_layer]`` and ``medusa_norm`` / ``medusa_output``), a safetensors file or a
    saved directory. The released models generate at 384 px with the 16x VQ: ``grid_size=24``."""
    path = Path(path)
    if path.is_dir():
        return hub.expect_type(hub.load_pretrained(path, device=device), NAR, path)
    sd = read_llamagen_state_dict(path)
    hub.require_keys(sd, (NAR_KEY, "medusa_norm.weight"), "a NAR GPT (a LlamaGen file has no vertical head)")
    config = gpt_config_from_state_dict(sd, grid_size, n_head)
    config.n_layer -= 1  # the file's last block belongs to the vertical head
    model = hub.load_strict(hub._build_on_meta(NAR, config), sd, f"NAR ({path.name})")
    return model.to(device).eval()


def load_llamagen_vq(path: str | os.PathLike, *, image_size: int = 256, device="cpu") -> SingleScaleVQ:
    """The single-scale VQ from ``vq_ds16_c2i.pt``, a safetensors file or a saved directory."""
    path = Path(path)
    if path.is_dir():
        vq = hub.expect_type(hub.load_pretrained(path, device=device), SingleScaleVQ, path)
    else:
        sd = read_llamagen_state_dict(path)
        vq = hub.load_strict(hub._build_on_meta(SingleScaleVQ, vq_config_from_state_dict(sd, image_size)), sd,
                             f"LlamaGen VQ ({path.name})")
    return vq.to(device).eval().requires_grad_(False)


def load_llamagen(vq_path, gpt_path, *, image_size: int | None = None, n_head: int | None = None, device="cpu"):
    """``(vq, gpt)`` for sampling, both strict; ``image_size`` (default: the VQ's) sets the GPT's token grid and
    ``n_head`` the head count of non-released ``.pt`` files (saved directories carry their config)."""
    vq = load_llamagen_vq(vq_path, image_size=image_size or 256, device=device)
    size = image_size or vq.image_size
    grid = size // vq.downsample
    gpt = load_llamagen_gpt(gpt_path, grid_size=grid, n_head=n_head, device=device)
    if gpt.vocab_size != vq.vocab_size:
        raise CheckpointMismatchError(f"the GPT (V={gpt.vocab_size}): the tokenizer has V={vq.vocab_size}")
    if image_size is not None and gpt.config.grid_size != grid:
        raise CheckpointMismatchError(f"{size} px images ({grid}x{grid} tokens): the GPT directory was saved "
                                      f"with a {gpt.config.grid_size}x{gpt.config.grid_size} grid")
    return vq, gpt.requires_grad_(False)


def bundled_ar_dir() -> Path | None:
    """``var/assets/ar_bundled`` (``tokenizer/`` + ``transformer/`` saved directories) if it is installed."""
    import var.assets
    path = Path(var.assets.__file__).resolve().parent / "ar_bundled"
    return path if (path / "transformer" / "config.json").exists() else None


def bundled_t2i_dir() -> Path | None:
    """``var/assets/t2i_bundled`` (``tokenizer/`` + ``transformer/`` + ``text_encoder/``) if it is installed."""
    import var.assets
    path = Path(var.assets.__file__).resolve().parent / "t2i_bundled"
    return path if (path / "text_encoder" / "config.json").exists() else None


def load_t2i_bundle(directory: str | os.PathLike, *, device="cpu"):
    """``(vq, gpt, text_encoder)`` of a directory written by :mod:`var.train.t2i_bundled` (all strict)."""
    from var.models.caption_encoder import CaptionEncoder
    directory = Path(directory)
    vq, gpt = load_llamagen(directory / "tokenizer", directory / "transformer", device=device)
    if not isinstance(gpt, GPTT2I):
        raise CheckpointMismatchError(f"a text-to-image GPT: {directory / 'transformer'} is class-conditional")
    enc = hub.expect_type(hub.load_pretrained(directory / "text_encoder", device=device), CaptionEncoder,
                          directory / "text_encoder")
    if enc.config.dim != gpt.config.caption_dim:
        raise CheckpointMismatchError(f"the GPT (caption_dim {gpt.config.caption_dim}): the text encoder has "
                                      f"dim {enc.config.dim}")
    return vq, gpt, enc.requires_grad_(False)
