"""Offline feature extractors for FID-style scores: no download, deterministic, CPU friendly.

An extractor maps images ``[B, 3, H, W]`` in [0, 1] to features ``[B, D]`` and carries a ``name`` that is printed
beside every number it produces (numbers from different extractors are never comparable).

* :class:`RandomConvFeatures` -- a fixed, seeded random convolutional network. Random conv features are a known
  stand-in for learned ones when nothing can be downloaded: they are sensitive to texture, colour and noise
  statistics, so the Frechet distance between feature sets grows with the distribution shift. Its numbers are
  NOT comparable to Inception FIDs.
* The classifier trained on the offline procedural dataset (``var.eval.classifier``, another module of this
  package) when it and its weights are present: its penultimate activations are semantic features for that
  dataset. :func:`load_offline_extractor` picks it first (``"auto"``).
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from var.errors import ConfigError

log = logging.getLogger(__name__)


class RandomConvFeatures(nn.Module):
    """A seeded random conv net: 3 stride-2 conv+ReLU stages at ``input_size`` px, mean- and std-pooled -> ``[B, D]``.

    The weights depend only on ``seed`` (drawn from a private ``torch.Generator``), so the same features come out
    on every machine. ``D = 2 * (c1 + c2 + c3)`` (means and standard deviations of every stage's channels).
    """

    def __init__(self, seed: int = 0, input_size: int = 32, channels: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        self.seed, self.input_size = seed, input_size
        gen = torch.Generator().manual_seed(seed)
        convs, c_in = [], 3
        for c_out in channels:
            conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1)
            fan_in = c_in * 9
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)
            convs.append(conv)
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        self.requires_grad_(False)
        self.eval()
        self.name = f"random-conv(seed={seed},{input_size}px,{'-'.join(map(str, channels))})"
        self.dim = 2 * sum(channels)

    @torch.no_grad()
    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        x = _prepare(images_B3HW, self.input_size, self.convs[0].weight)
        pooled = []
        for conv in self.convs:
            x = F.relu(conv(x))
            pooled += [x.mean(dim=(2, 3)), x.flatten(2).std(dim=2)]
        return torch.cat(pooled, dim=1).float()


class ClassifierFeatures(nn.Module):
    """Penultimate activations of a classifier (``model.features(x)`` if it has one, else its logits)."""

    def __init__(self, model: nn.Module, name: str, input_size: int | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name, self.input_size = name, input_size

    @torch.no_grad()
    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        x = _prepare(images_B3HW, self.input_size, param)
        fn = getattr(self.model, "features", None)
        out = fn(x) if callable(fn) else self.model(x)
        return out.flatten(1).float()


def _prepare(images_B3HW: torch.Tensor, size: int | None, like: torch.Tensor) -> torch.Tensor:
    """Check range/shape, resize to ``size`` (area down, bilinear up) and map [0, 1] -> [-1, 1]."""
    if images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
        raise ConfigError(f"expected images [B, 3, H, W], got {tuple(images_B3HW.shape)}")
    x = images_B3HW.to(device=like.device, dtype=like.dtype)
    if size is not None and x.shape[-1] != size:
        mode = "area" if x.shape[-1] > size else "bilinear"
        x = F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return x.mul(2).sub(1)


def uint8_to_float(images_BHW3: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` (numpy or tensor) -> float ``[B, 3, H, W]`` in [0, 1]."""
    t = torch.as_tensor(np.asarray(images_BHW3))
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise ConfigError(f"expected uint8 images [B, H, W, 3], got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float().div(255)


@torch.no_grad()
def extract_features(extractor: Callable[[torch.Tensor], torch.Tensor],
                     images: np.ndarray | torch.Tensor | Iterable, batch_size: int = 256) -> np.ndarray:
    """Features ``[N, D]`` (float64 numpy) of images given as uint8 ``[N, H, W, 3]``, float ``[N, 3, H, W]`` in
    [0, 1], or an iterable of such batches."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    else:
        batches = images
    feats = []
    for batch in batches:
        is_uint8 = (batch.dtype == np.uint8) if isinstance(batch, np.ndarray) else (batch.dtype == torch.uint8)
        x = uint8_to_float(batch) if is_uint8 else torch.as_tensor(batch).float()
        feats.append(extractor(x).double().cpu().numpy())
    if not feats:
        raise ConfigError("no images to extract features from")
    return np.concatenate(feats)


def _classifier_extractor(device, directory=None) -> ClassifierFeatures | None:
    """The offline-dataset classifier as an extractor, or None when its module or weights are absent."""
    try:
        from var.eval import classifier as clf_mod  # written by the training issue
    except ImportError:
        return None
    loader = getattr(clf_mod, "load_classifier", None)
    if loader is None:
        return None
    try:
        model = loader(directory) if directory is not None else loader()
    except Exception as e:  # missing weights, its own CheckpointError...: fall back, but say why
        log.info("offline classifier unavailable (%s: %s); using the random-conv extractor", type(e).__name__, e)
        return None
    if model is None:
        return None
    size = getattr(getattr(model, "config", None), "image_size", None) or getattr(model, "image_size", None)
    name = f"offline-classifier({type(model).__name__},{weights_digest(model)})"
    return ClassifierFeatures(model.to(device), name=name, input_size=size)


def weights_digest(model: nn.Module) -> str:
    """First 8 hex digits of a SHA-256 over the state dict: numbers from other weights get another name."""
    import hashlib
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:8]


def load_offline_extractor(name: str = "auto", *, device="cpu", seed: int = 0,
                           classifier_dir=None) -> nn.Module:
    """``"auto"``: the offline classifier (bundled, or saved in ``classifier_dir``) when its weights are present,
    else the random conv net; ``"classifier"``: require the classifier; ``"random-conv"``: the seeded random net."""
    if name in ("auto", "classifier"):
        ext = _classifier_extractor(device, classifier_dir)
        if ext is not None:
            return ext
        if name == "classifier":
            raise ConfigError("the offline classifier (var.eval.classifier.load_classifier) or its weights are "
                              "not available; use --extractor random-conv")
    elif name != "random-conv":
        raise ConfigError(f"unknown offline extractor {name!r}: auto, classifier or random-conv")
    return RandomConvFeatures(seed=seed).to(device)
