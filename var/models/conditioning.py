"""Class-label validation shared by the class-conditional models."""
from __future__ import annotations

import torch

from var.errors import ClassIdError


def check_class_labels(labels_B: torch.Tensor, num_classes: int) -> None:
    """Raise :class:`ClassIdError` unless ``labels_B`` is a 1-D integer tensor with ids in ``[0, num_classes]``
    (``num_classes`` itself is the null class used for unconditional sampling and CFG)."""
    if labels_B.dtype.is_floating_point or labels_B.ndim != 1:
        raise ClassIdError(f"labels must be a 1-D integer tensor, got {labels_B.dtype} {tuple(labels_B.shape)}")
    out_of_range = (labels_B < 0) | (labels_B > num_classes)
    if out_of_range.any():
        raise ClassIdError(f"class ids {labels_B[out_of_range].tolist()} out of range [0, {num_classes - 1}] "
                           f"(or {num_classes} for unconditional)")
