"""Per-class accuracy of class-conditional samples of the procedural shapes dataset, for any model.

A single overall "class accuracy" hides a model that draws the right colour but no texture (the shapes classifier
can tell the classes apart by colour alone). So every class gets three numbers:

* ``class``: the bundled shapes classifier (:func:`var.eval.classifier.load_classifier`) predicts the class;
* ``shape`` and ``texture``: the shape and texture heads of the bundled attribute judge
  (:mod:`var.eval.attributes`, trained on other colour/shape/texture combinations) match the class's shape and
  fill texture (:data:`var.train.data.SHAPE_CLASSES`); 100% / 90-100% on held-out real images.

    images_B3HW, labels_B = sample_per_class(lambda labels, gen: sampler(labels, gen), num_classes=10, per_class=50)
    report = class_accuracy_report(images_B3HW, labels_B)
    print(report.to_markdown())

``corner_colours`` measures the mean colour of the four corner pixels (the bundled VAR once drew a green
top-right pixel into every image).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from var.errors import ConfigError
from var.train.data import SHAPE_CLASSES, SHAPES, TEXTURES

# Pixel (row, column) of each corner of an S x S image, as a function of S.
CORNERS: dict[str, Callable[[int], tuple[int, int]]] = {
    "top_left": lambda s: (0, 0), "top_right": lambda s: (0, s - 1),
    "bottom_left": lambda s: (s - 1, 0), "bottom_right": lambda s: (s - 1, s - 1)}


@dataclass
class ClassAccuracyReport:
    """Accuracies per class (lists indexed by class id) and over all images (``overall``)."""

    classes: list[str]
    num_images: list[int]
    class_accuracy: list[float]
    shape_accuracy: list[float] | None = None      # None without the attribute judge
    texture_accuracy: list[float] | None = None
    overall: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        cols = ["class", "shape", "texture"] if self.shape_accuracy is not None else ["class"]
        lines = ["| class | images | " + " | ".join(f"{c} accuracy" for c in cols) + " |",
                 "|---|---|" + "---|" * len(cols)]
        rows = [self.class_accuracy] + ([self.shape_accuracy, self.texture_accuracy]
                                        if self.shape_accuracy is not None else [])
        for c, name in enumerate(self.classes):
            lines.append(f"| {name} | {self.num_images[c]} | " + " | ".join(f"{r[c]:.1%}" for r in rows) + " |")
        lines.append(f"| **all** | {sum(self.num_images)} | "
                     + " | ".join(f"**{self.overall[c]:.1%}**" for c in cols) + " |")
        return "\n".join(lines)


@torch.no_grad()
def sample_per_class(sample_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor], *, num_classes: int,
                     per_class: int, batch_size: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` samples of each class id ``0..num_classes-1`` (class-major order) from
    ``sample_fn(labels_B, generator) -> images [B, 3, S, S] in [0, 1]``, one seeded generator for the whole set.

    Returns ``(images [N, 3, S, S] in [-1, 1], labels [N])``."""
    if num_classes < 1 or per_class < 1 or batch_size < 1:
        raise ConfigError(f"num_classes, per_class and batch_size must be >= 1, got {num_classes}, {per_class}, "
                          f"{batch_size}")
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(seed)
    images = [sample_fn(labels[i:i + batch_size], gen).float().cpu() for i in range(0, len(labels), batch_size)]
    return torch.cat(images) * 2 - 1, labels


def _per_class(correct_B: torch.Tensor, labels_B: torch.Tensor, num_classes: int) -> list[float]:
    return [round(correct_B[labels_B == c].float().mean().item(), 4) if (labels_B == c).any() else float("nan")
            for c in range(num_classes)]


@torch.no_grad()
def class_accuracy_report(images_B3HW: torch.Tensor, labels_B: torch.Tensor, *, classifier=None,
                          attribute_classifier=None, attributes: bool = True,
                          num_classes: int | None = None) -> ClassAccuracyReport:
    """Per-class accuracies of images in [-1, 1] with class ids ``labels_B`` of the procedural shapes dataset.

    ``classifier`` defaults to the bundled shapes classifier, ``attribute_classifier`` to the bundled attribute
    judge (skipped when ``attributes`` is False); ``num_classes`` (default: the classifier's) are the classes
    reported, the first ones of the dataset (a model trained with fewer classes)."""
    from var.eval.classifier import load_classifier
    if images_B3HW.ndim != 4 or images_B3HW.shape[0] != labels_B.shape[0]:
        raise ConfigError(f"need images [N, 3, S, S] and labels [N], got {tuple(images_B3HW.shape)} and "
                          f"{tuple(labels_B.shape)}")
    classifier = classifier if classifier is not None else load_classifier()
    judged = classifier.config.num_classes
    if judged > len(SHAPE_CLASSES):
        raise ConfigError(f"the classifier has {judged} classes; the shapes dataset has {len(SHAPE_CLASSES)}")
    num_classes = judged if num_classes is None else num_classes
    if not 1 <= num_classes <= judged:
        raise ConfigError(f"num_classes must be in [1, {judged}] (the classifier's classes), got {num_classes}")
    if labels_B.numel() and not 0 <= int(labels_B.min()) <= int(labels_B.max()) < num_classes:
        raise ConfigError(f"labels must be class ids in [0, {num_classes - 1}], got {labels_B.min()}..{labels_B.max()}")
    labels_B = labels_B.cpu()
    hit_class = classifier.predict(images_B3HW).cpu() == labels_B
    report = ClassAccuracyReport(
        classes=[c.name for c in SHAPE_CLASSES[:num_classes]],
        num_images=[int((labels_B == c).sum()) for c in range(num_classes)],
        class_accuracy=_per_class(hit_class, labels_B, num_classes),
        overall={"class": round(hit_class.float().mean().item(), 4)})
    if attributes:
        from var.eval.attributes import load_attribute_classifier, predict_attributes
        judge = attribute_classifier if attribute_classifier is not None else load_attribute_classifier()
        pred_B3 = predict_attributes(judge, images_B3HW).cpu()
        shape_ids = torch.tensor([SHAPES.index(c.shape) for c in SHAPE_CLASSES[:num_classes]])
        texture_ids = torch.tensor([list(TEXTURES).index(c.texture) for c in SHAPE_CLASSES[:num_classes]])
        hit_shape, hit_texture = pred_B3[:, 1] == shape_ids[labels_B], pred_B3[:, 2] == texture_ids[labels_B]
        report.shape_accuracy = _per_class(hit_shape, labels_B, num_classes)
        report.texture_accuracy = _per_class(hit_texture, labels_B, num_classes)
        report.overall |= {"shape": round(hit_shape.float().mean().item(), 4),
                           "texture": round(hit_texture.float().mean().item(), 4)}
    return report


def corner_colours(images_B3HW: torch.Tensor) -> dict[str, list[float]]:
    """Mean RGB (0-255) of each corner pixel over images in [-1, 1], and of the pixels one step inside each
    corner diagonally (``inner_<corner>``, a reference free of that pixel's own artefact)."""
    if images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
        raise ConfigError(f"need RGB images [N, 3, S, S], got {tuple(images_B3HW.shape)}")
    u8 = (images_B3HW.float().clamp(-1, 1) + 1) * 127.5
    s = u8.shape[-1]
    out = {}
    for name, at in CORNERS.items():
        r, c = at(s)
        ri, ci = r + (1 if r == 0 else -1), c + (1 if c == 0 else -1)
        out[name] = [round(v, 1) for v in u8[:, :, r, c].mean(0).tolist()]
        out[f"inner_{name}"] = [round(v, 1) for v in u8[:, :, ri, ci].mean(0).tolist()]
    return out


__all__ = ["ClassAccuracyReport", "sample_per_class", "class_accuracy_report", "corner_colours"]
