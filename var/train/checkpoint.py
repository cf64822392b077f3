"""Atomic, self-verifying training checkpoints.

File layout: ``b"VARCKPT1"`` + 32-byte SHA-256 of the payload + the ``torch.save`` payload. A file is written to
``<name>.tmp``, flushed and fsync'ed, then renamed over the final name (``os.replace`` is atomic), so a kill at
any moment leaves either the old file or the complete new one. Reading checks the magic, the digest and the
required keys and raises :class:`~var.errors.CheckpointError` naming the file on any problem; the resume logic
then falls back to the newest checkpoint that verifies.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path

import torch

from var.errors import CheckpointError
from var.hub.io import torch_load_weights_only

log = logging.getLogger(__name__)

MAGIC = b"VARCKPT1"
REQUIRED_KEYS = ("step", "model", "optimizer", "scheduler", "data", "ranks", "config")
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"ckpt_{step:08d}.pt"


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` atomically with an integrity digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(hashlib.sha256(payload).digest())
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # a full disk or any error: no partial temporary is left in the out-dir
        tmp.unlink(missing_ok=True)
    try:  # make the rename durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and verify a checkpoint written by :func:`save_checkpoint` (``weights_only`` unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training checkpoint not found: {path}")
    data = path.read_bytes()
    if len(data) < len(MAGIC) + 32 or data[:len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path} is not a var training checkpoint (bad header; truncated or another format)")
    digest, payload = data[len(MAGIC):len(MAGIC) + 32], memoryview(data)[len(MAGIC) + 32:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path} is corrupt or partially written (SHA-256 mismatch over "
                              f"{len(payload)} payload bytes)")
    state = torch_load_weights_only(io.BytesIO(payload), path)
    missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks the training-state entries {missing}")
    return state


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``directory``, newest (highest step) first; ``.tmp`` leftovers are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_valid_checkpoint(directory: str | os.PathLike) -> tuple[Path, dict] | None:
    """``(path, state)`` of the newest checkpoint that verifies; corrupt ones are skipped with a warning."""
    for path in list_checkpoints(directory):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            log.warning("skipping unusable checkpoint: %s", e)
    return None


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (``keep <= 0`` keeps everything)."""
    if keep <= 0:
        return
    for path in list_checkpoints(directory)[keep:]:
        path.unlink(missing_ok=True)
