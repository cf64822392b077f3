"""var: visual autoregressive image generation (VAR next-scale and next-token models, samplers, KV caches).

    import var
    tok, model = var.hub.load_var("vae_ch160v4096z32.pth", "var_d16.pth")
    out = var.samplers.sample_next_scale(model, tok, [207, 360], cfg=1.5, top_k=900, top_p=0.96, generator=g)
"""

__version__ = "0.1.0"

from var import errors, hub, kernels, models, samplers, tokenizers  # noqa: F401,E402

__all__ = ["errors", "hub", "kernels", "models", "samplers", "tokenizers", "__version__"]
