"""Named model presets (timm-style): ``var.models.create("var_d16")``, ``list_models("var_*")``."""
from __future__ import annotations

import fnmatch
from typing import Callable

import torch.nn as nn

from var.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a preset factory under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def create(name: str, **overrides) -> nn.Module:
    """Build the preset ``name`` with config fields overridden by keyword arguments."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**overrides)


def list_models(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))
