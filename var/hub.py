"""Checkpoint loading and saving: released VAR files (``.pth``), this project's safetensors, strict checks.

* ``tok, model = load_var(vae_path, var_path)``: the released ``vae_ch160v4096z32.pth`` + ``var_d{16,20,24,30,36}.pth``
  (depth, width, schedule inferred from the file) or directories written by :func:`save_pretrained`.
* Every load is strict: a wrong file raises :class:`~var.errors.CheckpointMismatchError` naming the missing and
  unexpected keys and the shape mismatches. Pickles are read with ``torch.load(weights_only=True)``.
* Released file names (``"var_d16.pth"``) are downloaded from the Hugging Face repo ``FoundationVision/var`` when
  they are not local files and the network is available (never needed by the tests).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from var.errors import CheckpointError, CheckpointMismatchError
from var.models.registry import create
from var.models.var_model import VAR, VARConfig
from var.tokenizers.multiscale_vqvae import VAR_PATCH_NUMS_256, MultiScaleVQVAE, MultiScaleVQVAEConfig

log = logging.getLogger(__name__)

RELEASED_VAR_REPO = "FoundationVision/var"
RELEASED_VAR_FILES = ("vae_ch160v4096z32.pth", "var_d16.pth", "var_d20.pth", "var_d24.pth", "var_d30.pth",
                      "var_d36.pth")
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def saved_model_classes() -> dict:
    """``_class_name`` of a saved directory -> (module class, config dataclass); imported lazily."""
    from var.models.caption_encoder import CaptionEncoder, CaptionEncoderConfig
    from var.models.ctf import CTFStage2, CTFStage2Config
    from var.models.gpt import GPT, GPTConfig
    from var.models.gpt_t2i import GPTT2I, GPTT2IConfig
    from var.models.infinity import Infinity, InfinityConfig
    from var.models.nar import NAR
    from var.tokenizers.bsq_vae import BSQVAE, BSQVAEConfig
    from var.tokenizers.single_scale_vq import SingleScaleVQ, SingleScaleVQConfig
    return {"VAR": (VAR, VARConfig), "MultiScaleVQVAE": (MultiScaleVQVAE, MultiScaleVQVAEConfig),
            "GPT": (GPT, GPTConfig), "SingleScaleVQ": (SingleScaleVQ, SingleScaleVQConfig),
            "GPTT2I": (GPTT2I, GPTT2IConfig), "CaptionEncoder": (CaptionEncoder, CaptionEncoderConfig),
            "NAR": (NAR, GPTConfig), "CTFStage2": (CTFStage2, CTFStage2Config),
            "Infinity": (Infinity, InfinityConfig), "BSQVAE": (BSQVAE, BSQVAEConfig)}


# ---- reading files ------------------------------------------------------------------------------------------
def resolve_checkpoint(path_or_name: str | os.PathLike, cache_dir: str | None = None) -> Path:
    """A local path as is; a released file name is downloaded (once) from ``FoundationVision/var``."""
    path = Path(path_or_name)
    if path.exists():
        return path
    if path.name in RELEASED_VAR_FILES and str(path) == path.name:
        return _download_released(path.name, cache_dir)
    raise CheckpointError(f"checkpoint not found: {path} (give a local file or one of {RELEASED_VAR_FILES})")


def _download_released(filename: str, cache_dir: str | None) -> Path:
    try:
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(RELEASED_VAR_REPO, filename, cache_dir=cache_dir))
    except ImportError:
        pass
    import urllib.request
    target = Path(cache_dir or Path.home() / ".cache" / "var") / filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        url = f"https://huggingface.co/{RELEASED_VAR_REPO}/resolve/main/{filename}"
        log.info("downloading %s", url)
        try:
            urllib.request.urlretrieve(url, str(target) + ".part")
        except OSError as e:
            raise CheckpointError(f"{filename} is not local and could not be downloaded from {url}: {e}") from e
        os.replace(str(target) + ".part", target)
    return target


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, a ``save_pretrained`` directory or a ``.pth``/``.pt`` pickle.

    Pickles are loaded with ``weights_only=True``; training wrappers ``{"model": sd, ...}`` / ``{"ema": sd}``
    are unwrapped (``key`` picks one explicitly).
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt or not a checkpoint at all
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if key is not None:
        obj = obj[key]
    elif isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for candidate in ("ema", "model", "state_dict"):
            if isinstance(obj.get(candidate), dict):
                obj = obj[candidate]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj


# ---- strict loading -----------------------------------------------------------------------------------------
def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Load ``state_dict`` into ``module`` requiring identical keys and shapes (else a named error)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(what, missing, unexpected, mismatched)
    on_meta = any(t.is_meta for t in own.values())
    module.load_state_dict(state_dict, strict=True, assign=on_meta)
    return module


def _build_on_meta(cls, config):
    with torch.device("meta"):
        return cls(config)


# ---- config inference from released state dicts -------------------------------------------------------------
def require_keys(sd: dict[str, torch.Tensor], keys, what: str) -> None:
    """Raise :class:`CheckpointMismatchError` naming the ``keys`` absent from ``sd`` (a file of another model)."""
    absent = [k for k in keys if k not in sd]
    if absent:
        raise CheckpointMismatchError(what, missing=absent)


def count_indexed(sd: dict[str, torch.Tensor], pattern: str) -> int:
    """1 + the largest index the regex ``pattern`` captures in the keys (number of blocks, levels, ...)."""
    return 1 + max(int(m.group(1)) for k in sd if (m := re.match(pattern, k)))


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


def vqvae_config_from_state_dict(sd: dict[str, torch.Tensor], patch_nums=None,
                                 norm_groups: int = 32) -> MultiScaleVQVAEConfig:
    """Tokenizer sizes of a multi-scale VQ-VAE state dict; ``patch_nums`` comes from the VAR model and the
    GroupNorm group count is the released 32 (a plain state dict stores neither)."""
    require_keys(sd, ("encoder.conv_in.weight", "quantize.embedding.weight", "quantize.ema_vocab_hit_SV"),
                 "a multi-scale VQ-VAE (is this a transformer's file?)")
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = count_indexed(sd, r"encoder\.down\.(\d+)\.")
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    num_res = count_indexed(sd, r"encoder\.down\.0\.block\.(\d+)\.")
    vocab, z = sd["quantize.embedding.weight"].shape
    num_phi = sum(1 for k in sd if re.match(r"quantize\.quant_resi\.qresi_ls\.\d+\.weight", k))
    num_scales = sd["quantize.ema_vocab_hit_SV"].shape[0]
    if patch_nums is None:
        if num_scales != len(VAR_PATCH_NUMS_256):
            raise CheckpointError(f"tokenizer has {num_scales} scales: pass patch_nums explicitly")
        patch_nums = VAR_PATCH_NUMS_256
    if ch % norm_groups:
        raise CheckpointError(f"a plain tokenizer state dict with width {ch} cannot use {norm_groups} GroupNorm "
                              "groups: save such tokenizers with var.hub.save_pretrained (config.json)")
    return MultiScaleVQVAEConfig(vocab_size=vocab, z_channels=z, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res,
                                 using_sa="encoder.down.%d.attn.0.qkv.weight" % (levels - 1) in sd,
                                 using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd, share_quant_resi=num_phi,
                                 patch_nums=tuple(patch_nums), norm_groups=norm_groups)


# ---- our own format -----------------------------------------------------------------------------------------
def save_pretrained(module: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` (class name + config) and ``model.safetensors`` (atomic rename)."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": type(module).__name__, "config": module.config_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, directory / WEIGHTS_NAME)
    return directory


def load_pretrained(directory: str | os.PathLike, *, device="cpu") -> nn.Module:
    """Rebuild a module written by :func:`save_pretrained` and load its weights strictly."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.exists():
        raise CheckpointError(f"{directory} is not a saved model directory (no {CONFIG_NAME})")
    meta = json.loads(config_path.read_text())
    classes = saved_model_classes()
    if meta.get("_class_name") not in classes:
        raise CheckpointError(f"{config_path}: unknown model class {meta.get('_class_name')!r}")
    cls, config_cls = classes[meta["_class_name"]]
    module = _build_on_meta(cls, config_cls(**meta["config"]))
    load_strict(module, read_state_dict(directory), f"{cls.__name__} saved in {directory}")
    return module.to(device).eval()


def expect_type(module: nn.Module, cls: type, path) -> nn.Module:
    """``module`` if it is a ``cls``, else a :class:`CheckpointMismatchError` naming what ``path`` holds."""
    if not isinstance(module, cls):
        raise CheckpointMismatchError(f"a {cls.__name__}: {path} holds a {type(module).__name__}")
    return module


# ---- the public entry points --------------------------------------------------------------------------------
def load_var_transformer(path: str | os.PathLike, *, device="cpu", depth: int | None = None) -> VAR:
    """A VAR transformer from a released ``var_d*.pth``, a safetensors file or a saved directory."""
    path = resolve_checkpoint(path)
    if path.is_dir():
        model = expect_type(load_pretrained(path, device=device), VAR, path)
    else:
        sd = read_state_dict(path)
        model = load_strict(_build_on_meta(VAR, var_config_from_state_dict(sd)), sd, f"VAR ({path.name})")
    if depth is not None and model.config.depth != depth:
        raise CheckpointMismatchError(f"VAR-d{depth}: {path} holds a depth-{model.config.depth} model")
    return model.to(device).eval()


def load_var_tokenizer(path: str | os.PathLike, *, device="cpu", patch_nums=None) -> MultiScaleVQVAE:
    """The multi-scale VQ-VAE from ``vae_ch160v4096z32.pth``, a safetensors file or a saved directory."""
    path = resolve_checkpoint(path)
    if path.is_dir():
        tok = expect_type(load_pretrained(path, device=device), MultiScaleVQVAE, path)
    else:
        sd = read_state_dict(path)
        config = vqvae_config_from_state_dict(sd, patch_nums)
        tok = load_strict(_build_on_meta(MultiScaleVQVAE, config), sd, f"multi-scale VQ-VAE ({path.name})")
    return tok.to(device).eval().requires_grad_(False)


def load_var(vae_path, var_path, *, device="cpu", depth: int | None = None):
    """``(tokenizer, model)`` for sampling: strict loads, the model's schedule given to the tokenizer."""
    model = load_var_transformer(var_path, device=device, depth=depth)
    tok = load_var_tokenizer(vae_path, device=device, patch_nums=model.config.patch_nums)
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
    return load_strict(module, read_state_dict(resolve_checkpoint(path)), name).to(device).eval()


from var.hub_llamagen import load_llamagen, load_llamagen_gpt, load_llamagen_vq  # noqa: E402,F401  (LlamaGen)
