"""One dispatcher for every kernel in :mod:`var.kernels`: PyTorch reference or Triton.

The choice, in order of precedence: the ``backend=`` argument of the op, the environment variable
``VAR_KERNELS=torch|triton|auto``, then ``auto``. ``auto`` picks Triton when the tensors live on a CUDA device
(and Triton imports), or on the CPU when ``TRITON_INTERPRET=1`` is set (the Triton interpreter, used by the
tests); otherwise the PyTorch reference. Triton is imported lazily, on first use, so CPU users never need it.

Under ``auto``, a CUDA run without an importable Triton, or a kernel that fails to compile or launch
(:func:`disable_triton`), falls back to PyTorch for the rest of the process with one warning; an explicit
``triton`` raises instead.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

from var.errors import ConfigError

BACKENDS = ("torch", "triton", "auto")
_disabled: list[str] = []  # why auto stopped using Triton in this process (empty: it has not)


@functools.lru_cache(maxsize=1)
def triton_module():
    """``triton`` or None when it cannot be imported (checked once)."""
    try:
        return importlib.import_module("triton")
    except Exception:  # noqa: BLE001 - a broken GPU stack must not break the CPU path
        return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend(backend: str | None = None) -> str:
    """The requested choice: ``backend=``, else ``VAR_KERNELS``, else ``"auto"`` (validated, lower case)."""
    choice = (backend or os.environ.get("VAR_KERNELS") or "auto").lower()
    if choice not in BACKENDS:
        raise ConfigError(f"kernel backend must be one of {BACKENDS}, got {choice!r} "
                          f"(argument backend= or env VAR_KERNELS)")
    return choice


def disable_triton(reason: str) -> None:
    """Make ``auto`` choose PyTorch from now on; warns the first time only."""
    if not _disabled:
        warnings.warn(f"Triton kernels disabled, using the PyTorch path ({reason}); "
                      f"set VAR_KERNELS=triton to raise instead", RuntimeWarning, stacklevel=3)
    _disabled.append(reason)


def triton_disabled() -> bool:
    return bool(_disabled)


def resolve_backend(backend: str | None = None, device: torch.device | str | None = None) -> str:
    """Return ``"torch"`` or ``"triton"`` for an op whose tensors are on ``device``."""
    choice = requested_backend(backend)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if choice == "torch":
        return "torch"
    usable = device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    if choice == "triton":
        if not usable:  # checked before importing triton: its interpreter mode is fixed at first import
            raise ConfigError(f"backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1 on the CPU "
                              f"(tensors are on {device})")
        if triton_module() is None:
            raise ConfigError("backend 'triton' requested but triton cannot be imported")
        return "triton"
    if not usable or _disabled:
        return "torch"
    if triton_module() is None:
        if device.type == "cuda":
            disable_triton("triton cannot be imported")
        return "torch"
    return "triton"
