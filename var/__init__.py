"""var: visual autoregressive image generation (VAR next-scale and next-token models, samplers, KV caches).

    import var
    tok, model = var.hub.load_var("vae_ch160v4096z32.pth", "var_d16.pth")
    out = var.samplers.sample_next_scale(model, tok, [207, 360], cfg=1.5, top_k=900, top_p=0.96, generator=g)

Subpackages load on first access (``var.hub`` above), so ``import var.kernels`` loads the kernels and what they
need, not the whole toolkit.
"""
import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("errors", "hub", "kernels", "models", "samplers", "tokenizers")
__all__ = [*_SUBPACKAGES, "__version__"]


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"var.{name}")
    raise AttributeError(f"module 'var' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBPACKAGES))
