"""Device names checked up front: ``--device cuda`` on a machine without CUDA is a named error, not an
``AssertionError`` from deep inside torch."""
from __future__ import annotations

import torch

from var.errors import ConfigError


def check_device(name: str | torch.device) -> torch.device:
    """``torch.device(name)`` after checking that it exists here (``cpu``, ``cuda[:i]``, ``mps``, ...)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {name!r} (cpu, cuda, cuda:N, mps ...)") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but CUDA is not available here (no GPU or a CPU-only "
                              f"torch build): use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA devices are visible")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"device {name!r} asked for, but MPS is not available here")
    return device
