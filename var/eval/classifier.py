"""A small CNN classifier of the offline dataset: the judge of bundled-model samples and an offline feature
extractor (its penultimate layer) for FID-style metrics when Inception weights are not available.

    clf = train_classifier(ProceduralShapes(20000, seed=0), steps=600)
    save_classifier(clf, "var/assets/classifier");  clf = load_classifier()      # bundled copy
    logits = clf(images_in_minus1_1);  feats_BD = clf.features(images_in_minus1_1)
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from var.errors import CheckpointError, ImageSizeError
from var.utils.files import atomic_path

log = logging.getLogger(__name__)

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


@dataclass
class ClassifierConfig:
    num_classes: int = 10
    image_size: int = 32        # inputs of another size are resized (bilinear) to this
    widths: tuple = (16, 32, 64, 128)   # stage widths; every stage after the first halves the resolution
    norm_groups: int = 8

    def __post_init__(self):
        self.widths = tuple(self.widths)

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]


def _conv_block(c_in: int, c_out: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU())


class ShapeClassifier(nn.Module):
    """Conv stages (GroupNorm, SiLU) -> global average pool (the features) -> linear logits."""

    def __init__(self, config: ClassifierConfig | None = None, **overrides):
        super().__init__()
        self.config = config = config or ClassifierConfig(**overrides)
        stages, c_in = [], 3
        for i, w in enumerate(config.widths):
            stages.append(_conv_block(c_in, w, 1 if i == 0 else 2, config.norm_groups))
            c_in = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(config.feature_dim, config.num_classes)

    def _prepare(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        if images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
            raise ImageSizeError(f"classifier takes RGB images [B, 3, H, W] in [-1, 1], got {tuple(images_B3HW.shape)}")
        size = self.config.image_size
        if tuple(images_B3HW.shape[2:]) != (size, size):
            images_B3HW = F.interpolate(images_B3HW.float(), size=(size, size), mode="bilinear", align_corners=False,
                                        antialias=True)
        return images_B3HW.float()

    def features(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, feature_dim]`` of images in [-1, 1]."""
        return self.stages(self._prepare(images_B3HW)).mean(dim=(2, 3))

    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Class logits ``[B, num_classes]``."""
        return self.fc(self.features(images_B3HW))

    @torch.no_grad()
    def predict(self, images_B3HW: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted class ids ``[B]`` (eval mode, batched)."""
        return torch.cat([self(images_B3HW[i:i + batch_size]).argmax(-1)
                          for i in range(0, len(images_B3HW), batch_size)])

    def config_dict(self) -> dict:
        return asdict(self.config)


@torch.no_grad()
def accuracy(model: ShapeClassifier, images_B3HW: torch.Tensor, labels_B: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    acc = (model.predict(images_B3HW) == labels_B.to(images_B3HW.device)).float().mean().item()
    model.train(was_training)
    return acc


def warmup_cosine_schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 5% of ``steps``, then cosine decay to zero (the classifiers' schedule)."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))


def fit_classifier(config: ClassifierConfig, batch_loss, *, num_images: int, steps: int, batch_size: int,
                   lr: float, weight_decay: float, seed: int, device="cpu", what: str = "classifier") -> ShapeClassifier:
    """A :class:`ShapeClassifier` of ``config`` (weights seeded by ``seed``; the global RNG is left as it was)
    trained for ``steps`` AdamW steps, linear warm-up then cosine decay, on random batches of the ``num_images``
    training images: ``batch_loss(model, idx_B, gen)`` is the loss of the images at ``idx_B``; ``gen`` (seeded by
    ``seed``) draws the indices and any augmentation, so the result is deterministic for a given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapeClassifier(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = warmup_cosine_schedule(opt, steps)
    model.train()
    for step in range(steps):
        loss = batch_loss(model, torch.randint(0, num_images, (batch_size,), generator=gen), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f", what, step, steps, loss.item())
    return model.eval()


def train_classifier(dataset, *, steps: int = 600, batch_size: int = 128, lr: float = 2e-3,
                     weight_decay: float = 0.05, seed: int = 0, device="cpu", augment: bool = True,
                     config: ClassifierConfig | None = None) -> ShapeClassifier:
    """Train on every image of ``dataset`` (a :class:`~var.train.data.ProceduralShapes` or any dataset with
    ``tensors()``) with AdamW, linear warm-up then cosine decay; random flips and +-2 px shifts when
    ``augment``. Deterministic for a given ``seed``."""
    images, labels = dataset.tensors()
    config = config or ClassifierConfig(num_classes=int(dataset.num_classes), image_size=images.shape[-1])

    def batch_loss(model, idx, gen):
        x, y = images[idx], labels[idx]
        if augment:
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        return F.cross_entropy(model(x.to(device)), y.to(device))
    return fit_classifier(config, batch_loss, num_images=len(images), steps=steps, batch_size=batch_size, lr=lr,
                          weight_decay=weight_decay, seed=seed, device=device)


def save_classifier(model: ShapeClassifier, directory: str | os.PathLike) -> Path:
    """``config.json`` + ``model.safetensors`` (atomic rename), like :func:`var.hub.save_pretrained`."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"_class_name": "ShapeClassifier", "config": model.config_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    return directory


def bundled_classifier_dir() -> Path | None:
    from var.assets import ASSETS_DIR
    path = ASSETS_DIR / "classifier"
    return path if (path / CONFIG_NAME).exists() else None


def load_classifier(directory: str | os.PathLike | None = None, *, device="cpu") -> ShapeClassifier:
    """Load a saved classifier (default: the bundled one trained on ``ProceduralShapes(seed=0)``), eval mode."""
    from var.hub import config_from_dict, load_strict, read_config_json, read_state_dict
    if directory is None:
        directory = bundled_classifier_dir()
        if directory is None:
            raise CheckpointError("no bundled classifier in var/assets/classifier: train one with "
                                  "`python scripts/eval_bundled.py --train-classifier`")
    directory = Path(directory)
    meta = read_config_json(directory)
    if meta["_class_name"] != "ShapeClassifier":
        raise CheckpointError(f"{directory} holds a {meta['_class_name']!r}, not a ShapeClassifier")
    model = ShapeClassifier(config_from_dict(ClassifierConfig, meta["config"], directory / CONFIG_NAME))
    load_strict(model, read_state_dict(directory), f"ShapeClassifier in {directory}")
    return model.to(device).eval().requires_grad_(False)
