"""Image conversion and grids written with PIL (no torchvision needed)."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from var.errors import ConfigError
from var.utils.files import atomic_path


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of any PIL image. 16-bit greyscale (modes ``I;16*`` and ``I``, as PNGs load) is scaled
    by 1/257 first: PIL's own ``convert("RGB")`` clips it at 255, which turns every such image white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        arr = np.asarray(image).astype(np.float64) / 257.0
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")


def to_uint8_hwc(images_B3HW: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] ``[B, 3, H, W]`` -> uint8 ``[B, H, W, 3]`` (rounded, clamped)."""
    return images_B3HW.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images_B3HW: torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile a batch (values in [0, 1]) into one uint8 ``[H', W', 3]`` array, ``nrow`` images per row."""
    arr = to_uint8_hwc(images_B3HW)
    B, H, W, _ = arr.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = np.zeros((rows * (H + padding) + padding, nrow * (W + padding) + padding, 3), dtype=np.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        y, x = padding + r * (H + padding), padding + c * (W + padding)
        grid[y:y + H, x:x + W] = arr[i]
    return grid


def image_format(path: str | os.PathLike) -> str:
    """PIL's format name for the extension of ``path`` (``.png`` -> ``PNG``); an unknown one is a ConfigError, so
    a bad output name fails before any sampling instead of after it."""
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise ConfigError(f"cannot write an image named {path}: give a .png (or .jpg, .webp ...) file name")
    return fmt


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    """``image.save(path)`` through a temporary file and a rename: a full disk leaves no partial image."""
    fmt = image_format(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt)
    return Path(path)


def save_image_grid(images_B3HW: torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
                    min_side: int = 256, labels: list[str] | None = None) -> Path:
    """Save a grid image; small images are enlarged (nearest) so the grid is at least ``min_side`` px wide.
    ``labels``: one caption per image, written under its tile (cut to the tile's width)."""
    grid = Image.fromarray(make_grid(images_B3HW, nrow))
    factor = math.ceil(min_side / grid.width) if grid.width < min_side else 1
    grid = grid.resize((grid.width * factor, grid.height * factor), Image.NEAREST)
    if labels is not None:
        if len(labels) != len(images_B3HW):
            raise ConfigError(f"{len(labels)} labels for {len(images_B3HW)} images")
        grid = _with_labels(grid, labels, images_B3HW.shape[-1], nrow or math.ceil(math.sqrt(len(labels))), factor)
    return save_image_atomic(grid, path)


def _with_labels(grid: Image.Image, labels: list[str], side: int, nrow: int, factor: int,
                 padding: int = 2, strip: int = 12) -> Image.Image:
    """``grid`` (tiles of ``side`` px, ``padding`` apart, enlarged ``factor`` times) with a caption strip under
    every row of tiles."""
    from PIL import ImageDraw
    step, rows = (side + padding) * factor, math.ceil(len(labels) / nrow)
    out = Image.new("RGB", (grid.width, grid.height + rows * strip))
    draw = ImageDraw.Draw(out)
    max_chars = max(1, side * factor // 6)  # PIL's default bitmap font is about 6 px per character
    for r in range(rows):
        top = r * (step + strip)
        out.paste(grid.crop((0, r * step, grid.width, (r + 1) * step + padding * factor)), (0, top))
        for c, text in enumerate(labels[r * nrow:(r + 1) * nrow]):
            draw.text((padding * factor + c * step, top + step + padding * factor - 1), text[:max_chars],
                      fill=(230, 230, 230))
    return out


def save_images(images_B3HW: torch.Tensor, directory: str | os.PathLike, start_index: int = 0) -> list[Path]:
    """Save each image as a lossless ``{index:06d}.png`` in ``directory`` (atomic writes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(to_uint8_hwc(images_B3HW)):
        paths.append(save_image_atomic(Image.fromarray(arr), directory / f"{start_index + i:06d}.png"))
    return paths
