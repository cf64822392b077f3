"""Sample export for evaluation: lossless PNG folders and the packed ``.npz`` that the ADM evaluator reads.

* :func:`write_pngs` writes ``{index:06d}.png`` atomically (temporary name + rename), so a killed writer never
  leaves a truncated PNG under a final name.
* :func:`pack_npz` streams a PNG folder into ``<folder>.npz`` with one array ``arr_0`` of uint8 ``[N, H, W, 3]``
  (the layout of OpenAI's ``evaluations/evaluator.py`` sample batches), without holding all images in memory.
* :func:`load_images` reads either form back as uint8 ``[N, H, W, 3]``.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from var.errors import ConfigError, ImageSizeError
from var.utils.files import atomic_path
from var.utils.images import pil_to_rgb, save_image_atomic, to_uint8_hwc

PNG_NAME = "{:06d}.png"


def write_pngs(images: torch.Tensor | np.ndarray, directory: str | os.PathLike, indices) -> list[Path]:
    """Save images (float ``[B, 3, H, W]`` in [0, 1] or uint8 ``[B, H, W, 3]``) as ``{index:06d}.png``."""
    arr = images if isinstance(images, np.ndarray) else to_uint8_hwc(images)
    indices = list(indices)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) != len(indices):
        raise ImageSizeError(f"expected {len(indices)} uint8 images [B, H, W, 3], got {arr.dtype} {arr.shape}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, img in zip(indices, arr):
        paths.append(save_image_atomic(Image.fromarray(img), directory / PNG_NAME.format(index)))
    return paths


def list_pngs(directory: str | os.PathLike) -> list[Path]:
    """The ``*.png`` files of a folder (hidden temporaries excluded), sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"not a folder: {directory}")
    return sorted(p for p in directory.glob("*.png") if not p.name.startswith("."))


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(pil_to_rgb(img), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's "image file is truncated" does not name the file
        raise ConfigError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def pack_npz(directory: str | os.PathLike, out: str | os.PathLike | None = None,
             expected_count: int | None = None) -> Path:
    """Pack the PNGs of ``directory`` (sorted by name) into ``out`` (default ``<directory>.npz``), key ``arr_0``.

    All images must share one size. The array is streamed into the (uncompressed, zip64) archive row by row, so
    50,000 256 px images (9.8 GB) need no more memory than one image. Written to a temporary file, then renamed.
    """
    paths = list_pngs(directory)
    if expected_count is not None and len(paths) != expected_count:
        raise ConfigError(f"{directory} holds {len(paths)} PNGs, expected {expected_count}")
    if not paths:
        raise ConfigError(f"no PNGs in {directory}")
    first = _read_png(paths[0])
    shape = (len(paths), *first.shape)
    out = Path(out) if out is not None else Path(str(Path(directory)).rstrip("/") + ".npz")
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                     "fortran_order": False, "shape": shape})
            for path in paths:
                img = _read_png(path)
                if img.shape != first.shape:
                    raise ImageSizeError(f"{path} is {img.shape}, the first PNG is {first.shape}")
                f.write(np.ascontiguousarray(img).tobytes())
    return out


def load_images(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` from a PNG folder or an ``.npz`` (``arr_0``) / ``.npy`` file."""
    path = Path(path)
    if limit is not None and limit < 1:  # a slice [:-1] would silently drop one image
        raise ConfigError(f"limit must be >= 1 (or not given), got {limit}")
    if path.is_dir():
        paths = list_pngs(path)[:limit]
        if not paths:
            raise ConfigError(f"no PNGs in {path}")
        return np.stack([_read_png(p) for p in paths])
    if path.suffix not in (".npz", ".npy"):
        raise ConfigError(f"cannot read images from {path}: give a PNG folder, .npz or .npy")
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "arr_0" not in data:
                    raise ConfigError(f"{path} has no 'arr_0' array (keys: {sorted(data.keys())})")
                arr = np.asarray(data["arr_0"][:limit])
        else:
            arr = np.asarray(np.load(path, mmap_mode="r", allow_pickle=False)[:limit])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated, corrupt or not numpy at all
        raise ConfigError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ImageSizeError(f"{path}: expected uint8 [N, H, W, 3], got {arr.dtype} {arr.shape}")
    return arr
