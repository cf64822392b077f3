"""Training data: an offline procedural class-conditional dataset, an ImageNet-style folder dataset, and a
resumable, rank-sharded batch sampler.

Every item is ``(image [3, S, S] float in [-1, 1], label)``. Augmentation randomness (crop offset, flip) never
comes from a global RNG: the sampler hands each index together with its own seed (``(index, aug_seed)``), so
batches are identical with any number of loader workers and after ``--resume``.
"""
from __future__ import annotations

import colorsys
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from var.errors import ConfigError
from var.utils.images import pil_to_rgb

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")


def _split_item(item) -> tuple[int, int | None]:
    if isinstance(item, (tuple, list)):
        return int(item[0]), int(item[1])
    return int(item), None


def to_model_range(arr_HW3: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float ``[3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(arr_HW3)).permute(2, 0, 1).float().div(127.5).sub(1.0)


# ---- procedural shapes ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeClass:
    """One class of :class:`ProceduralShapes`: a shape, a hue and a fill texture."""

    name: str
    shape: str
    hue: float
    texture: str


# Each class differs from every other one in shape AND hue (and most in texture), so a single cue suffices to
# tell them apart: learnable by a 1M-parameter model in minutes, and a sample is only counted as its class by
# the classifier when the generator gets the class-specific combination right.
SHAPE_CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass("red_disc", "disc", 0.00, "solid"),
    ShapeClass("orange_square", "square", 0.08, "solid"),
    ShapeClass("yellow_triangle", "triangle", 0.16, "solid"),
    ShapeClass("lime_ring", "ring", 0.26, "solid"),
    ShapeClass("green_cross", "cross", 0.36, "solid"),
    ShapeClass("teal_hstripes", "square", 0.48, "hstripes"),
    ShapeClass("blue_diamond", "diamond", 0.62, "solid"),
    ShapeClass("indigo_checker", "disc", 0.72, "checker"),
    ShapeClass("purple_vstripes", "triangle", 0.80, "vstripes"),
    ShapeClass("pink_star", "star", 0.91, "solid"),
)


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Boolean mask of ``shape`` centred at 0 with circumradius ``radius``, rotated by ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    r = np.sqrt(xx ** 2 + yy ** 2)
    if shape == "disc":
        return r <= radius
    if shape == "ring":
        return (r <= radius) & (r >= 0.55 * radius)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= radius * 0.75
    if shape == "diamond":
        return np.abs(xx) + np.abs(yy) <= radius
    if shape == "cross":
        arm = radius * 0.3
        return ((np.abs(u) <= arm) & (np.abs(v) <= radius)) | ((np.abs(v) <= arm) & (np.abs(u) <= radius))
    if shape in ("triangle", "star"):
        theta = np.arctan2(v, u)
        if shape == "triangle":  # polygon with 3 sides: r * cos(theta - nearest vertex-normal) <= inradius
            k = 3
            sector = np.mod(theta, 2 * np.pi / k) - np.pi / k
            return r * np.cos(sector) <= radius * 0.5
        k = 5  # five-pointed star: radius oscillates between inner and outer
        sector = np.abs(np.mod(theta, 2 * np.pi / k) - np.pi / k) / (np.pi / k)
        return r <= radius * (0.45 + 0.55 * sector ** 2)
    raise ConfigError(f"unknown shape {shape!r}")


def _texture(texture: str, xx: np.ndarray, yy: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Multiplicative brightness pattern in [0.45, 1] of the fill."""
    if texture == "solid":
        return np.ones_like(xx)
    if texture == "hstripes":
        return np.where(np.mod(yy + phase, period) < period / 2, 1.0, 0.45)
    if texture == "vstripes":
        return np.where(np.mod(xx + phase, period) < period / 2, 1.0, 0.45)
    if texture == "checker":
        a = np.mod(xx + phase, period) < period / 2
        b = np.mod(yy + phase, period) < period / 2
        return np.where(a ^ b, 1.0, 0.45)
    raise ConfigError(f"unknown texture {texture!r}")


def render_shape(cls: ShapeClass, rng: np.random.Generator, size: int = 32, supersample: int = 4) -> np.ndarray:
    """One image of class ``cls`` as uint8 ``[size, size, 3]``; all variation is drawn from ``rng``.

    Varies: position, size, rotation, hue (+-0.02), saturation/brightness, stripe phase, background grey level
    and a little pixel noise. Rendered at ``supersample`` x resolution and box-filtered (anti-aliased edges).
    """
    n = size * supersample
    coords = (np.arange(n) + 0.5) / supersample - size / 2
    radius = size * rng.uniform(0.26, 0.40)
    cx, cy = rng.uniform(-0.12, 0.12, size=2) * size
    xx, yy = np.meshgrid(coords - cx, coords - cy)
    angle = rng.uniform(-0.35, 0.35)
    mask = _shape_mask(cls.shape, xx, yy, radius, angle).astype(np.float64)
    pattern = _texture(cls.texture, xx, yy, period=size * rng.uniform(0.18, 0.24), phase=rng.uniform(0, size))
    hue = (cls.hue + rng.uniform(-0.02, 0.02)) % 1.0
    rgb = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0)))
    background = rng.uniform(0.05, 0.3) * np.ones(3) + rng.uniform(-0.03, 0.03, size=3)
    fg = (mask * pattern)[..., None] * rgb
    img = fg + (1 - mask)[..., None] * background
    img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    img = img + rng.normal(0, 0.015, size=img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


class ProceduralShapes(torch.utils.data.Dataset):
    """Offline, deterministic class-conditional dataset: 10 classes of coloured, textured shapes.

    Image ``i`` is a pure function of ``(seed, i)``; label ``i % num_classes`` (balanced). Nothing is downloaded
    or stored: the dataset is re-created bit-identically anywhere from its seed. ``hflip`` flips with
    probability 1/2 using the per-item augmentation seed supplied by :class:`ResumableBatchSampler`.
    """

    def __init__(self, num_images: int = 20000, *, image_size: int = 32, seed: int = 0, num_classes: int = 10,
                 hflip: bool = False, cache: bool = True):
        if not 1 <= num_classes <= len(SHAPE_CLASSES):
            raise ConfigError(f"num_classes must be in [1, {len(SHAPE_CLASSES)}], got {num_classes}")
        if image_size < 8:
            raise ConfigError(f"image_size must be >= 8, got {image_size}")
        self.num_images, self.image_size, self.seed = num_images, image_size, seed
        self.num_classes, self.hflip = num_classes, hflip
        self.classes = [c.name for c in SHAPE_CLASSES[:num_classes]]
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_images

    def label(self, index: int) -> int:
        return index % self.num_classes

    def image_uint8(self, index: int) -> np.ndarray:
        """The un-augmented image ``index`` as uint8 ``[S, S, 3]``."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        rng = np.random.default_rng([self.seed, index])
        arr = render_shape(SHAPE_CLASSES[self.label(index)], rng, self.image_size)
        if self._cache is not None:
            self._cache[index] = arr
        return arr

    def __getitem__(self, item):
        index, aug_seed = _split_item(item)
        arr = self.image_uint8(index)
        if self.hflip and aug_seed is not None and np.random.default_rng(aug_seed).random() < 0.5:
            arr = arr[:, ::-1]
        return to_model_range(arr), self.label(index)

    def tensors(self, indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-augmented images ``[N, 3, S, S]`` in [-1, 1] and labels ``[N]`` (all images by default)."""
        indices = range(self.num_images) if indices is None else indices
        images = torch.stack([to_model_range(self.image_uint8(i)) for i in indices])
        return images, torch.tensor([self.label(i) for i in indices], dtype=torch.long)


# ---- folders --------------------------------------------------------------------------------------------------
# ---- compositional captions (text-to-image) ---------------------------------------------------------------------
# Colour, shape and texture are drawn independently (unlike SHAPE_CLASSES, where the class fixes all three).
COLOURS: dict[str, float] = {"red": 0.00, "orange": 0.08, "yellow": 0.16, "green": 0.33, "teal": 0.48,
                             "blue": 0.62, "purple": 0.78, "pink": 0.91}
SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "cross", "diamond", "star")
TEXTURES: dict[str, str] = {"solid": "", "hstripes": "with horizontal stripes", "vstripes": "with vertical stripes",
                            "checker": "with checkers"}
# Colour-shape pairs never rendered for training (any texture): one per colour, every shape at least once. The
# bundled text-to-image model's accuracy on these prompts, next to the trained pairs, measures composition.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "star"), ("orange", "ring"), ("yellow", "disc"), ("green", "triangle"), ("teal", "cross"),
    ("blue", "square"), ("purple", "diamond"), ("pink", "ring"))


@dataclass(frozen=True)
class Attributes:
    """What a compositional caption says: a colour, a shape and a texture (keys of the tables above)."""

    colour: str
    shape: str
    texture: str = "solid"

    def __post_init__(self):
        if self.colour not in COLOURS or self.shape not in SHAPES or self.texture not in TEXTURES:
            raise ConfigError(f"unknown attributes {self}: colours {list(COLOURS)}, shapes {list(SHAPES)}, "
                              f"textures {list(TEXTURES)}")

    @property
    def caption(self) -> str:
        """e.g. ``a teal square with horizontal stripes`` (``a pink star`` when solid)."""
        return " ".join(w for w in ("a", self.colour, self.shape, TEXTURES[self.texture]) if w)

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS

    def ids(self) -> tuple[int, int, int]:
        """``(colour, shape, texture)`` indices into the tables (the attribute classifier's targets)."""
        return list(COLOURS).index(self.colour), SHAPES.index(self.shape), list(TEXTURES).index(self.texture)

    @classmethod
    def parse(cls, caption: str) -> "Attributes":
        """The attributes a caption of this grammar names (colour and shape are required)."""
        words = caption.lower().split()
        colours = [w for w in words if w in COLOURS]
        shapes = [w for w in words if w in SHAPES]
        textures = [t for t, phrase in TEXTURES.items() if phrase and phrase in " ".join(words)]
        if len(colours) != 1 or len(shapes) != 1 or len(textures) > 1:
            raise ConfigError(f"{caption!r} does not name one colour ({', '.join(COLOURS)}) and one shape "
                              f"({', '.join(SHAPES)})")
        return cls(colours[0], shapes[0], textures[0] if textures else "solid")


def all_attributes(held_out: bool | None = None) -> list[Attributes]:
    """Every (colour, shape, texture); ``held_out=False``: the trained ones, ``True``: the held-out ones."""
    out = [Attributes(c, s, t) for c in COLOURS for s in SHAPES for t in TEXTURES]
    return out if held_out is None else [a for a in out if a.held_out == held_out]


def render_attributes(attrs: Attributes, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One uint8 ``[size, size, 3]`` image of ``attrs`` (same renderer and jitter as :func:`render_shape`)."""
    return render_shape(ShapeClass(attrs.caption, attrs.shape, COLOURS[attrs.colour], attrs.texture), rng, size)


class CompositionalShapes(torch.utils.data.Dataset):
    """Offline captioned shapes: image ``i`` shows ``attributes(i)``, drawn uniformly from the trained
    combinations (``held_out=False``, the default), the held-out ones (``True``) or all (``None``, e.g. for the
    attribute classifier, which must recognise every combination); a pure function of ``(seed, i)``.
    Items are ``(image [3, S, S] in [-1, 1], caption)``."""

    def __init__(self, num_images: int = 20000, *, image_size: int = 32, seed: int = 0,
                 held_out: bool | None = False):
        self.num_images, self.image_size, self.seed = num_images, image_size, seed
        self.choices = all_attributes(held_out)

    def __len__(self) -> int:
        return self.num_images

    def attributes(self, index: int) -> Attributes:
        return self.choices[int(np.random.default_rng([self.seed, index, 1]).integers(len(self.choices)))]

    def image_uint8(self, index: int) -> np.ndarray:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        return render_attributes(self.attributes(index), np.random.default_rng([self.seed, index]), self.image_size)

    def __getitem__(self, item):
        index, _ = _split_item(item)
        return to_model_range(self.image_uint8(index)), self.attributes(index).caption

    def tensors(self, indices: Sequence[int] | None = None) -> tuple[torch.Tensor, list[Attributes]]:
        """Images ``[N, 3, S, S]`` in [-1, 1] and their attributes (all images by default)."""
        indices = range(self.num_images) if indices is None else indices
        return (torch.stack([to_model_range(self.image_uint8(i)) for i in indices]),
                [self.attributes(i) for i in indices])


class ImageFolderDataset(torch.utils.data.Dataset):
    """ImageNet-style folder: ``root/<class name>/<image>``; class ids follow the sorted folder names.

    Train transform: resize the shorter side to ``round(resize_ratio * image_size)`` (Lanczos), random crop
    ``image_size`` (center crop when ``train=False``), optional horizontal flip, scale to [-1, 1].
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 256, *, train: bool = True,
                 resize_ratio: float = 1.125, hflip: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"dataset folder {root} does not exist")
        # hidden folders (.ipynb_checkpoints, .git ...) and folders without images are not classes: counting them
        # would shift every label after them
        self.classes, files_of = [], {}
        for d in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(d).parts))
            if files:
                self.classes.append(d.name)
                files_of[d.name] = files
            else:
                log.warning("%s holds no images with extensions %s: not a class", d, IMAGE_EXTENSIONS)
        if not self.classes:
            raise ConfigError(f"{root} has no class sub-folders with images (expected root/<class>/<image> with "
                              f"extensions {IMAGE_EXTENSIONS})")
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            self.samples += [(p, label) for p in files_of[name]]
        if not self.samples:
            raise ConfigError(f"{root} has class folders but no images with extensions {IMAGE_EXTENSIONS}")
        self.num_classes = len(self.classes)
        self.root, self.skipped = root, []  # skipped: unreadable files met so far (in this process)
        self.image_size, self.train, self.hflip = image_size, train, hflip
        self.resize_to = max(image_size, round(resize_ratio * image_size))

    def __len__(self) -> int:
        return len(self.samples)

    def _open(self, index: int) -> tuple[Image.Image, int]:
        """Image ``index`` as RGB and its label; an unreadable file is logged by name, counted in ``skipped`` and
        replaced by the next readable image (deterministic, so a resumed run sees the same batches)."""
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as im:
                    return pil_to_rgb(im), label
            except (OSError, ValueError, SyntaxError) as e:  # truncated, corrupt or not an image
                if str(path) not in self.skipped:
                    self.skipped.append(str(path))
                    log.warning("skipping unreadable image %s (%s: %s); %d skipped so far", path,
                                type(e).__name__, e, len(self.skipped))
        raise ConfigError(f"none of the {len(self.samples)} images under {self.root} can be read")

    def __getitem__(self, item):
        index, aug_seed = _split_item(item)
        im, label = self._open(index)
        with im:
            w, h = im.size
            scale = self.resize_to / min(w, h)
            im = im.resize((max(self.resize_to, round(w * scale)), max(self.resize_to, round(h * scale))),
                           Image.LANCZOS)
            arr = np.asarray(im)
        H, W, S = arr.shape[0], arr.shape[1], self.image_size
        rng = np.random.default_rng(aug_seed if aug_seed is not None else [index])
        if self.train:
            top, left = int(rng.integers(0, H - S + 1)), int(rng.integers(0, W - S + 1))
        else:
            top, left = (H - S) // 2, (W - S) // 2
        arr = arr[top:top + S, left:left + S]
        if self.train and self.hflip and rng.random() < 0.5:
            arr = arr[:, ::-1]
        return to_model_range(arr), label


# ---- sampling -------------------------------------------------------------------------------------------------
class ResumableBatchSampler(torch.utils.data.Sampler):
    """Infinite, rank-sharded batches of ``(index, aug_seed)`` whose position can be saved and restored.

    Epoch ``e`` is a permutation drawn from ``seed + e`` (the same on every rank); rank ``r`` of ``W`` takes
    the batches ``r, r + W, ...`` of it (drop-last, so all ranks do the same number of steps). The state is
    ``(epoch, batch)``: the next batch to yield, advanced as batches are *consumed* via :meth:`advance`.
    """

    def __init__(self, dataset_len: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        self.batches_per_epoch = dataset_len // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise ConfigError(f"dataset of {dataset_len} images is smaller than one global batch "
                              f"({batch_size} x {world_size} ranks)")
        self.n, self.batch_size, self.seed = dataset_len, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def batch_at(self, epoch: int, batch: int) -> list[tuple[int, int]]:
        order = self._order(epoch)
        start = (batch * self.world_size + self.rank) * self.batch_size
        idx = order[start:start + self.batch_size].tolist()
        base = (self.seed * 1_000_003 + epoch) * 1_000_003
        return [(i, (base + i) % (2 ** 63)) for i in idx]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batch = self.epoch, self.batch
        while True:
            yield self.batch_at(epoch, batch)
            batch += 1
            if batch == self.batches_per_epoch:
                epoch, batch = epoch + 1, 0

    def advance(self) -> None:
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("n", "batch_size", "world_size", "seed"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(f"cannot resume the data position: {key} was {state[key]}, now "
                                  f"{getattr(self, key)}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def build_dataset(name_or_path: str, *, image_size: int, train: bool = True, hflip: bool = False,
                  num_images: int = 20000, seed: int = 0, num_classes: int = 10):
    """``"shapes"`` -> :class:`ProceduralShapes`; anything else is a folder for :class:`ImageFolderDataset`."""
    if name_or_path == "shapes":
        return ProceduralShapes(num_images, image_size=image_size, seed=seed, num_classes=num_classes, hflip=hflip)
    return ImageFolderDataset(name_or_path, image_size, train=train, hflip=hflip)
