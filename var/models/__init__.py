"""Transformers: VAR next-scale model (and the next-token GPT family), plus the preset registry."""
from var.models import presets  # noqa: F401  (registers the presets)
from var.models.registry import create, list_models, register_model
from var.models.var_model import VAR, VARConfig

__all__ = ["VAR", "VARConfig", "create", "list_models", "register_model"]
