"""The colour / shape / texture judge of text-to-image samples (separate from the shipped class classifier, whose
class-accuracy figures stay comparable): a :class:`~var.eval.classifier.ShapeClassifier` whose logits are three
heads side by side, ``[colours | shapes | textures]`` (:data:`~var.train.data.COLOURS`, ``SHAPES``, ``TEXTURES``).

    clf = train_attribute_classifier(CompositionalShapes(12000, seed=1, held_out=None), steps=800)
    colour, shape, texture = predict_attributes(clf, images)       # index tensors [B]
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from var.errors import CheckpointError
from var.eval.classifier import ClassifierConfig, ShapeClassifier, fit_classifier, load_classifier, save_classifier
from var.train.data import COLOURS, SHAPES, TEXTURES, Attributes

log = logging.getLogger(__name__)

HEADS = (len(COLOURS), len(SHAPES), len(TEXTURES))


def prompt_accuracy(model: ShapeClassifier, images_B3HW: torch.Tensor, prompts: list[str]) -> float | None:
    """Share of images (in [-1, 1]) whose colour and shape, as the classifier sees them, are the ones their prompt
    names; None when a prompt is not of the bundled grammar (``a <colour> <shape> [with <texture>]``)."""
    from var.errors import ConfigError
    try:
        want = attribute_targets([Attributes.parse(p) for p in prompts])
    except ConfigError:
        return None
    pred = predict_attributes(model, images_B3HW)
    return ((pred[:, 0] == want[:, 0]) & (pred[:, 1] == want[:, 1])).float().mean().item()


def split_logits(logits_BK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(logits_BK.split(HEADS, dim=-1))


def attribute_targets(attrs: list[Attributes]) -> torch.Tensor:
    """``[B, 3]`` (colour, shape, texture) indices."""
    return torch.tensor([a.ids() for a in attrs], dtype=torch.long)


@torch.no_grad()
def predict_attributes(model: ShapeClassifier, images_B3HW: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted ``[B, 3]`` (colour, shape, texture) indices of images in [-1, 1]."""
    model.eval()
    out = []
    for i in range(0, len(images_B3HW), batch_size):
        out.append(torch.stack([h.argmax(-1) for h in split_logits(model(images_B3HW[i:i + batch_size]))], -1))
    return torch.cat(out)


def train_attribute_classifier(dataset, *, steps: int = 800, batch_size: int = 128, lr: float = 2e-3,
                               weight_decay: float = 0.05, seed: int = 0) -> ShapeClassifier:
    """Sum of the three heads' cross-entropies on every image of a
    :class:`~var.train.data.CompositionalShapes`; AdamW, warm-up + cosine; random +-2 px shifts (no flips:
    they would not change the labels, but keep the judge's input distribution the renderer's)."""
    images, attrs = dataset.tensors()
    targets = attribute_targets(attrs)

    def batch_loss(model, idx, gen):
        dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
        heads = split_logits(model(torch.roll(images[idx], shifts=(dy, dx), dims=(2, 3))))
        return sum(F.cross_entropy(h, targets[idx, k]) for k, h in enumerate(heads))
    return fit_classifier(ClassifierConfig(num_classes=sum(HEADS), image_size=images.shape[-1]), batch_loss,
                          num_images=len(images), steps=steps, batch_size=batch_size, lr=lr,
                          weight_decay=weight_decay, seed=seed, what="attribute classifier")


def bundled_attribute_classifier_dir() -> Path | None:
    from var.assets import ASSETS_DIR
    path = ASSETS_DIR / "attribute_classifier"
    return path if (path / "config.json").exists() else None


def load_attribute_classifier(directory=None, *, device="cpu") -> ShapeClassifier:
    """The bundled judge (default) or a saved one; checks that its heads match the attribute tables."""
    directory = directory or bundled_attribute_classifier_dir()
    if directory is None:
        raise CheckpointError("no bundled attribute classifier in var/assets/attribute_classifier: train one with "
                              "`var-bench t2i-bundled --train-classifier`")
    model = load_classifier(directory, device=device)
    if model.config.num_classes != sum(HEADS):
        raise CheckpointError(f"{directory} has {model.config.num_classes} outputs, not the {sum(HEADS)} "
                              f"attribute logits (colours {HEADS[0]}, shapes {HEADS[1]}, textures {HEADS[2]})")
    return model


__all__ = ["HEADS", "split_logits", "attribute_targets", "predict_attributes", "train_attribute_classifier",
           "load_attribute_classifier", "save_classifier"]
