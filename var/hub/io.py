"""Checkpoint I/O shared by every model family: reading state dicts, strict loading, our own saved format.

* :func:`read_state_dict` is the only reader of weight files (``.safetensors``, saved directories, ``.pth``/``.pt``
  pickles). Pickles are read with ``torch.load(weights_only=True)``; ``argparse.Namespace`` (LlamaGen pickles its
  training arguments next to the weights) is the one class on the allow-list.
* Training files wrap the weights: the first entry of :data:`UNWRAP_ORDER` present is used, for every family.
* :func:`load_strict` requires identical keys and shapes and names what differs, and finite weights
  (:func:`check_finite_weights`).
* :func:`save_pretrained` / :func:`load_pretrained`: ``config.json`` + ``model.safetensors``;
  :func:`read_config_json` / :func:`config_from_dict` check that file (every key present, known and of its type).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from var.errors import CheckpointError, CheckpointMismatchError, ConfigError, NonFiniteWeightsError, VarError
from var.utils.files import atomic_path

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"

# Why EMA first: the averaged weights are the ones a training run keeps for sampling (var-train saves them as the
# final model); pass ``key="model"`` to get the raw weights of a file that holds both. "model" is DDP's wrapper
# (VAR, LlamaGen), "module" DeepSpeed's, "state_dict" Lightning's.
UNWRAP_ORDER = ("ema", "model", "module", "state_dict")


def saved_model_classes() -> dict:
    """``_class_name`` of a saved directory -> (module class, config dataclass); imported lazily."""
    from var.models.ctf import CTFStage2, CTFStage2Config
    from var.models.gpt import GPT, GPTConfig
    from var.models.caption_encoder import CaptionEncoder, CaptionEncoderConfig
    from var.models.gpt_t2i import GPTT2I, GPTT2IConfig
    from var.models.infinity import Infinity, InfinityConfig
    from var.tokenizers.bsq_vae import BSQVAE, BSQVAEConfig
    from var.models.nar import NAR
    from var.models.var_model import VAR, VARConfig
    from var.tokenizers.multiscale_vqvae import MultiScaleVQVAE, MultiScaleVQVAEConfig
    from var.tokenizers.single_scale_vq import SingleScaleVQ, SingleScaleVQConfig
    return {"VAR": (VAR, VARConfig), "MultiScaleVQVAE": (MultiScaleVQVAE, MultiScaleVQVAEConfig),
            "GPT": (GPT, GPTConfig), "SingleScaleVQ": (SingleScaleVQ, SingleScaleVQConfig),
            "GPTT2I": (GPTT2I, GPTT2IConfig), "CaptionEncoder": (CaptionEncoder, CaptionEncoderConfig),
            "NAR": (NAR, GPTConfig), "CTFStage2": (CTFStage2, CTFStage2Config),
            "Infinity": (Infinity, InfinityConfig), "BSQVAE": (BSQVAE, BSQVAEConfig)}


# ---- reading files ------------------------------------------------------------------------------------------
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


def torch_load_weights_only(source, path, allowed=()):
    """``torch.load(source, weights_only=True)`` with ``allowed`` classes on the allow-list, never anything less
    safe. A refusal is a :class:`CheckpointError` naming ``path`` and what to do, without torch's advice to rerun
    with ``weights_only=False`` (which would let the file run code)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused:
            raise CheckpointError(
                f"{path} pickles {refused.group(1)}, which var does not unpickle: unpickling it could run code, and "
                "var never falls back to an unsafe load. If you trust the file, extract its tensors in a separate "
                "session and save them with safetensors.torch.save_file; var reads .safetensors files directly") \
                from None
        # torch's own text of the cause, without its paragraphs of advice
        parts = [p.strip() for p in str(e).split("WeightsUnpickler error:")[-1].split("\n\n") if p.strip()]
        reason = parts[0].splitlines()[0].split(". ")[0][:200] if parts else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: not a readable PyTorch checkpoint (corrupt, truncated "
                              f"or another format): {reason}") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, a :func:`save_pretrained` directory or a ``.pth``/``.pt`` pickle.

    A training wrapper (``{"model": sd, "ema": sd, "args": ..., ...}``) is unwrapped: ``key`` picks an entry
    explicitly, else the first of :data:`UNWRAP_ORDER` (EMA weights before raw ones) that holds a dict. A plain
    state dict is returned as it is, whatever ``key``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            return load_file(str(path))
        except Exception as e:  # truncated, corrupt or not a safetensors file
            raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    obj = torch_load_weights_only(path, path, allowed=(argparse.Namespace,))
    if key is not None and not _is_state_dict(obj):
        if not isinstance(obj, dict) or key not in obj:
            entries = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise CheckpointError(f"{path} has no entry {key!r} (it holds {entries})")
        obj = obj[key]
    elif isinstance(obj, dict) and not _is_state_dict(obj):
        obj = next((obj[k] for k in UNWRAP_ORDER if isinstance(obj.get(k), dict)), obj)
    if not _is_state_dict(obj):
        held = f" (it holds the entries {sorted(map(str, obj))})" if isinstance(obj, dict) else ""
        raise CheckpointError(f"{path} does not hold a state dict of tensors{held}")
    return obj


# ---- strict loading -----------------------------------------------------------------------------------------
def non_finite_tensors(tensors: dict[str, torch.Tensor], buffers=frozenset()) -> list[str]:
    """``"name (n NaN, m inf of N)"`` of every floating-point tensor holding NaN or infinite values; the names in
    ``buffers`` may hold ``-inf`` (additive attention masks such as VAR's ``attn_bias_for_masking`` mark blocked
    positions with it) but never NaN or ``+inf``."""
    bad = []
    for key, t in tensors.items():
        if not torch.is_tensor(t) or t.is_meta or not t.is_floating_point():
            continue
        nan, inf = int(t.isnan().sum()), int(t.isinf().sum())
        if key in buffers:
            inf = int((t == float("inf")).sum())
        if nan or inf:
            bad.append(f"{key} ({nan} NaN, {inf} inf of {t.numel()})")
    return bad


def raise_non_finite(bad: list[str], what: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the tensors of :func:`non_finite_tensors` (when any)."""
    if bad:
        shown = ", ".join(bad[:12]) + (f" ... (+{len(bad) - 12} more)" if len(bad) > 12 else "")
        raise NonFiniteWeightsError(f"{what} holds non-finite weights in {len(bad)} tensor(s): {shown}")


def check_finite_weights(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming every tensor of ``state_dict`` with NaN or infinite values.

    Parameters must be finite; buffers of ``module`` may hold ``-inf`` (:func:`non_finite_tensors`).
    """
    raise_non_finite(non_finite_tensors(state_dict, {name for name, _ in module.named_buffers()}), what)


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Load ``state_dict`` into ``module`` requiring identical keys and shapes (else a named error) and finite
    weights (:func:`check_finite_weights`)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(what, missing, unexpected, mismatched)
    check_finite_weights(module, state_dict, what)
    on_meta = any(t.is_meta for t in own.values())
    module.load_state_dict(state_dict, strict=True, assign=on_meta)
    return module


def build_on_meta(cls, config):
    """``cls(config)`` without allocating or initialising weights (a strict load assigns them)."""
    with torch.device("meta"):
        return cls(config)


def _a(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def expect_type(module: nn.Module, cls: type, path) -> nn.Module:
    """``module`` if it is a ``cls``, else a :class:`CheckpointMismatchError` naming what ``path`` holds."""
    if not isinstance(module, cls):
        raise CheckpointMismatchError(f"{_a(cls.__name__)}: {path} holds {_a(type(module).__name__)}")
    return module


# Keys that only one kind of file holds (released or saved by ``var``): a file given as another kind is named in
# one line, instead of a list of the missing keys of the model that was asked for.
FILE_KINDS = {
    "a VAR transformer": ("class_emb.weight", "pos_1LC"),
    "an Infinity transformer": ("cfg_uncond", "text_proj_for_sos.ca.mat_q"),
    "VAR's multi-scale VQ-VAE": ("quantize.embedding.weight",),
    "an Infinity BSQ VAE": ("quantize.lfq.mask", "quantizer.lfq.mask"),
}


def check_file_kind(sd: dict[str, torch.Tensor], want: str, path) -> None:
    """Raise :class:`CheckpointMismatchError` if ``sd`` is a file of a :data:`FILE_KINDS` kind other than ``want``."""
    for kind, markers in FILE_KINDS.items():
        if kind != want and any(key in sd for key in markers):
            raise CheckpointMismatchError(f"{want}: {Path(path).name} is {kind} file")


# ---- config inference helpers -------------------------------------------------------------------------------
def require_keys(sd: dict[str, torch.Tensor], keys, what: str) -> None:
    """Raise :class:`CheckpointMismatchError` naming the ``keys`` absent from ``sd`` (a file of another model)."""
    absent = [k for k in keys if k not in sd]
    if absent:
        raise CheckpointMismatchError(what, missing=absent)


def count_indexed(sd: dict[str, torch.Tensor], pattern: str) -> int:
    """1 + the largest index the regex ``pattern`` captures in the keys (number of blocks, levels, ...)."""
    return 1 + max(int(m.group(1)) for k in sd if (m := re.match(pattern, k)))


def encoder_sizes(sd: dict[str, torch.Tensor], levels: str, blocks: str) -> tuple[int, tuple[int, ...], int]:
    """``(ch, ch_mult, num_res_blocks)`` of a VQGAN-style convolutional encoder: the base width of
    ``encoder.conv_in``, one multiplier per level ``encoder.<levels>.<i>`` (its first residual block's width / ch)
    and the residual blocks ``encoder.<levels>.0.<blocks>.<j>`` of a level."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    num_levels = count_indexed(sd, rf"encoder\.{levels}\.(\d+)\.")
    ch_mult = tuple(sd[f"encoder.{levels}.{i}.{blocks}.0.conv1.weight"].shape[0] // ch for i in range(num_levels))
    return ch, ch_mult, count_indexed(sd, rf"encoder\.{levels}\.0\.{blocks}\.(\d+)\.")


def released_norm_groups(norm_groups: int | None, released: dict, key, what: str) -> int:
    """``norm_groups`` when given, else the released GroupNorm count for ``key`` (a width) in ``released``; a plain
    state dict does not store the count and a wrong one loads without a shape error, so an unknown ``what`` (a
    phrase naming the model and its width) is refused."""
    groups = norm_groups or released.get(key)
    if groups is None:
        raise CheckpointError(f"{what} and a plain state dict does not store its GroupNorm count: pass norm_groups, "
                              "or save the model with var.hub.save_pretrained (a directory with config.json)")
    return groups


# ---- our own format -----------------------------------------------------------------------------------------
def save_pretrained(module: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` (class name + config) and ``model.safetensors`` (atomic rename)."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": type(module).__name__, "config": module.config_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp))
    return directory


def read_config_json(directory: str | os.PathLike) -> dict:
    """The ``{"_class_name": str, "config": dict}`` object of a saved directory's ``config.json``, or a
    :class:`CheckpointError` naming the file and what is wrong with it."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a saved model directory (no {CONFIG_NAME})")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (truncated or hand-edited?): {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(meta).__name__}")
    for key, kind in (("_class_name", str), ("config", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{path} needs the key {key!r} holding a JSON {'string' if kind is str else 'object'}"
                                  f", got {meta.get(key)!r}")
    return meta


def _json_kind_ok(value, example) -> bool:
    """Whether a JSON ``value`` has the kind of the field default ``example`` (JSON has lists, not tuples)."""
    if example is None:
        return True
    if isinstance(example, bool):
        return isinstance(value, bool)
    if isinstance(example, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(example, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(example, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(example))


def config_from_dict(config_cls, values: dict, path) -> object:
    """``config_cls(**values)`` for the ``config`` of ``path``: every field present (a missing key would silently
    take its default), no unknown key, each of its default's JSON kind; errors name ``path`` and the key."""
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    missing = sorted(set(fields) - set(values))
    unknown = sorted(set(values) - set(fields))
    if missing or unknown:
        parts = ([f"missing keys {missing}"] if missing else []) + ([f"unknown keys {unknown}"] if unknown else [])
        raise CheckpointError(f"{path}: the {config_cls.__name__} has {' and '.join(parts)}")
    for name, f in fields.items():
        example = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if not _json_kind_ok(values[name], example):
            raise CheckpointError(f"{path}: key {name!r} must be a {type(example).__name__}, got {values[name]!r}")
    try:
        return config_cls(**values)
    except (VarError, TypeError, ValueError) as e:  # the config's own range checks
        raise CheckpointError(f"{path}: {e}") from e


def load_pretrained(directory: str | os.PathLike, *, device="cpu") -> nn.Module:
    """Rebuild a module written by :func:`save_pretrained` and load its weights strictly."""
    directory = Path(directory)
    meta = read_config_json(directory)
    classes = saved_model_classes()
    if meta["_class_name"] not in classes:
        raise CheckpointError(f"{directory / CONFIG_NAME}: unknown model class {meta['_class_name']!r} "
                              f"(known: {', '.join(classes)})")
    cls, config_cls = classes[meta["_class_name"]]
    module = build_on_meta(cls, config_from_dict(config_cls, meta["config"], directory / CONFIG_NAME))
    load_strict(module, read_state_dict(directory), f"{cls.__name__} saved in {directory}")
    return module.to(device).eval()


def bundled_pair(first, second, names: tuple[str, str], bundle_dir, what: str):
    """``(first, second)`` paths, or the bundled ``tokenizer`` / ``transformer`` directories when both are None
    (``bundle_dir``: :mod:`var.assets`' directory of that bundle, None when it is not installed)."""
    if first is None and second is None:
        if bundle_dir is None:
            raise ConfigError(f"no bundled {what} is installed: give the {names[0]} and {names[1]} files")
        return bundle_dir / "tokenizer", bundle_dir / "transformer"
    if first is None or second is None:
        raise ConfigError(f"give both {names[0]} and {names[1]} (or neither, for the bundled {what})")
    return first, second
