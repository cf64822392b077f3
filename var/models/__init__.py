"""Transformers: VAR next-scale model (and the next-token GPT family), plus the preset registry."""
from var.models import presets  # noqa: F401  (registers the presets)
from var.models import gpt_presets  # noqa: F401
from var.models import nar_ctf_presets  # noqa: F401
from var.models.gpt import GPT, GPTConfig
from var.models.registry import create, list_models, register_model
from var.models.var_model import VAR, VARConfig

__all__ = ["VAR", "VARConfig", "GPT", "GPTConfig", "create", "list_models", "register_model"]
