"""Released checkpoint names -> local files, through ``huggingface_hub`` (its cache, its retries, its auth).

``huggingface_hub`` is the optional ``[hub]`` extra: only a bare released file name with no such local file
needs it, so loading local files and running the tests never touch the network or the package.
"""
from __future__ import annotations

import os
from pathlib import Path

from var.errors import CheckpointError, MissingDependencyError


def resolve_checkpoint(path_or_name: str | os.PathLike, released: dict[str, str],
                       cache_dir: str | None = None) -> Path:
    """A local path as is; a bare file name of ``released`` (file name -> Hub repo) is downloaded (once)."""
    path = Path(path_or_name)
    if path.exists():
        return path
    if path.name in released and str(path) == path.name:
        return download_released(released[path.name], path.name, cache_dir)
    raise CheckpointError(f"checkpoint not found: {path} (give a local file or one of {tuple(released)})")


def download_released(repo_id: str, filename: str, cache_dir: str | None = None) -> Path:
    """``filename`` of the Hub repo ``repo_id`` in the local Hugging Face cache (downloaded when absent)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise MissingDependencyError(f"{filename} is not a local file and downloading released checkpoints needs "
                              "huggingface_hub: pip install 'var-toolkit[hub]' (or pass a local path)") from e
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir))
    except Exception as e:  # offline, unknown repo/file, HTTP errors: one named error with the cause
        if type(e).__name__ == "LocalEntryNotFoundError":  # no network (or HF_HUB_OFFLINE=1) and not cached
            raise CheckpointError(
                f"{filename} is not in the local Hugging Face cache and cannot be downloaded from {repo_id} "
                f"(offline or no network): pass a local path to the file, or fetch it once on a machine with network "
                f"(huggingface_hub.hf_hub_download({repo_id!r}, {filename!r})) and copy the cache (HF_HOME)") from e
        raise CheckpointError(f"{filename} could not be downloaded from the Hugging Face repo {repo_id}: "
                              f"{type(e).__name__}: {e}") from e
