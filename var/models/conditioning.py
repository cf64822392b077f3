"""What a next-token model is conditioned on: class ids (a 1-D integer tensor) or captions (:class:`CaptionCondition`).

Samplers pass either through untouched: a model turns its condition into its prefix (``prefill``), builds the
CFG batch (``condition_rows``) and checks it (``check_condition``). Both kinds support ``len(cond)`` and
``cond.device``, which is all a sampler needs to know about them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from var.errors import ClassIdError, ConfigError


def check_class_labels(labels_B: torch.Tensor, num_classes: int) -> None:
    """Raise :class:`ClassIdError` unless ``labels_B`` is a 1-D integer tensor with ids in ``[0, num_classes]``
    (``num_classes`` itself is the null class used for unconditional sampling and CFG)."""
    if labels_B.dtype.is_floating_point or labels_B.ndim != 1:
        raise ClassIdError(f"labels must be a 1-D integer tensor, got {labels_B.dtype} {tuple(labels_B.shape)}")
    out_of_range = (labels_B < 0) | (labels_B > num_classes)
    if out_of_range.any():
        raise ClassIdError(f"class ids {labels_B[out_of_range].tolist()} out of range [0, {num_classes - 1}] "
                           f"(or {num_classes} for unconditional)")


@dataclass
class CaptionCondition:
    """Caption features in the model's prefix layout: ``features_BTC [B, T, C]`` (zero at padding) and
    ``mask_BT [B, T]`` bool (True at real tokens), ``T`` = the model's caption length.

    Build one with :meth:`left_padded` from per-prompt features (LlamaGen's layout: text at the end).
    """

    features_BTC: torch.Tensor
    mask_BT: torch.Tensor

    def __post_init__(self):
        f, m = self.features_BTC, self.mask_BT
        if f.ndim != 3 or m.shape != f.shape[:2] or m.dtype != torch.bool or not f.dtype.is_floating_point:
            raise ConfigError(f"a caption condition is float features [B, T, C] and a bool mask [B, T], got "
                              f"{f.dtype} {tuple(f.shape)} and {m.dtype} {tuple(m.shape)}")

    def __len__(self) -> int:
        return self.features_BTC.shape[0]

    @property
    def device(self) -> torch.device:
        return self.features_BTC.device

    def to(self, device=None, dtype: torch.dtype | None = None) -> "CaptionCondition":
        return CaptionCondition(self.features_BTC.to(device=device, dtype=dtype), self.mask_BT.to(device))

    def cat(self, other: "CaptionCondition") -> "CaptionCondition":
        return CaptionCondition(torch.cat((self.features_BTC, other.features_BTC)),
                                torch.cat((self.mask_BT, other.mask_BT)))

    @classmethod
    def left_padded(cls, features: list[torch.Tensor], length: int) -> "CaptionCondition":
        """Per-prompt features ``[n_i, C]`` (real tokens only) -> the first ``length`` rows of each, written at the
        end of a zero ``[B, length, C]`` block (LlamaGen's training and sampling layout)."""
        if not features:
            raise ConfigError("a caption condition needs at least one caption")
        dims = {f.shape[-1] for f in features}
        if len(dims) != 1 or any(f.ndim != 2 or f.shape[0] < 1 for f in features):
            raise ConfigError(f"caption features must be [n >= 1, C] with one C, got "
                              f"{[tuple(f.shape) for f in features]}")
        out = features[0].new_zeros(len(features), length, dims.pop())
        mask = torch.zeros(len(features), length, dtype=torch.bool, device=out.device)
        for b, f in enumerate(features):
            n = min(length, f.shape[0])
            out[b, length - n:] = f[:n]
            mask[b, length - n:] = True
        return cls(out, mask)

    @classmethod
    def from_prompt_embeddings(cls, emb, length: int) -> "CaptionCondition":
        """From a text encoder's batch (``features_BNC`` with the first ``lengths_B[b]`` rows real, e.g.
        :class:`var.models.text_encoder.PromptEmbeddings`): truncated to ``length`` rows and left padded."""
        return cls.left_padded([f[:int(n)] for f, n in zip(emb.features_BNC, emb.lengths_B)], length)

    @classmethod
    def from_feature_files(cls, paths, length: int) -> "CaptionCondition":
        """From LlamaGen's precomputed T5 features: one ``.npy`` per caption holding ``[1, n, C]`` float32 (the
        valid rows only, as ``language/extract_t5_feature.py`` writes them); read without pickle."""
        return cls.left_padded([read_caption_feature_file(p) for p in paths], length)


def read_caption_feature_file(path) -> torch.Tensor:
    """``[n, C]`` float32 from a LlamaGen ``.npy`` caption feature file (``[1, n, C]`` or ``[n, C]``)."""
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read caption features {path}: {e}") from e
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.dtype.kind != "f":
        raise ConfigError(f"{path}: caption features must be float [1, n, C] or [n, C], got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.astype(np.float32))
